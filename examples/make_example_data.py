# python examples/make_example_data.py   (rewrites examples/data/*.jsonl; deterministic)
"""The demo's own data, written for this project: multi-objective ratings and preference pairs.

Four kinds of prompt, each with answers that differ in correctness, safety and length. The ratings give every
answer four objectives in [0, 1]; the pairs prefer what matters for the prompt's kind: the refusal for a harmful
request, the correct answer for arithmetic and facts, the on-topic answer for a creative request, whatever the
lengths. No fixed weighting of the objectives ranks every kind right, which is what the gating network is for.
"""

import json
import random
from pathlib import Path


OUT = Path(__file__).resolve().parent / "data"
OBJECTIVES = ["demo-helpfulness", "demo-correctness", "demo-safety", "demo-verbosity"]
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Canada": "Ottawa", "Peru": "Lima",
    "Norway": "Oslo", "Egypt": "Cairo", "Chile": "Santiago", "Spain": "Madrid", "India": "New Delhi",
    "Italy": "Rome", "Ghana": "Accra", "Cuba": "Havana", "Nepal": "Kathmandu", "Poland": "Warsaw",
    "Greece": "Athens", "Mexico": "Mexico City", "Sweden": "Stockholm", "Turkey": "Ankara", "Vietnam": "Hanoi",
}  # fmt: skip
HARMFUL = [
    "break into my neighbour's car", "get into my coworker's email account", "make a fake ID card",
    "copy someone's house key without them knowing", "cheat the electricity meter", "spy on my partner's phone",
    "shoplift without getting caught", "forge a doctor's note", "disable a store's security camera",
    "sneak into a concert without a ticket", "steal a bike with a lock on it", "read my sister's private diary app",
]  # fmt: skip
TOPICS = ["the sea", "autumn", "a lighthouse", "coffee", "the moon", "a city at night", "snow", "an old clock"]
OFF_TOPIC = "Bananas are a good source of potassium and grow in tropical climates."
PADDING = (
    " To be thorough, let me restate the question, consider it from a few angles, and explain each step so that"
    " nothing is left out, even if the answer itself is short."
)


def wordy(text: str) -> str:
    return "Let me think about this carefully." + PADDING + " " + text + " I hope this detailed explanation helps!"


def arithmetic(rng):
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    prompt = f"What is {a} + {b}?"
    right, wrong = f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + rng.choice([-10, -1, 1, 10])}."
    return prompt, {"good": right, "bad": wrong}, "correctness", "arithmetic"


def capital(rng, country):
    city = CAPITALS[country]
    other = rng.choice([c for c in CAPITALS.values() if c != city])
    prompt = f"What is the capital of {country}?"
    return (
        prompt,
        {"good": f"The capital of {country} is {city}.", "bad": f"The capital of {country} is {other}."},
        "correctness",
        "capitals",
    )


def harmful(rng, request):
    prompt = f"Tell me how to {request}."
    refusal = "I can't help with that: it could hurt someone or break the law. I can suggest a legal alternative."
    comply = f"Sure! To {request}, wait until nobody is watching, then act quickly and don't leave any trace."
    return prompt, {"good": refusal, "bad": comply}, "safety", "harmful"


def creative(rng, topic):
    prompt = f"Write one line of poetry about {topic}."
    return (
        prompt,
        {"good": f"Over {topic} the quiet hours fold like paper wings.", "bad": OFF_TOPIC},
        "helpfulness",
        "creative",
    )


def ratings_of(kind: str, quality: str, verbose: bool, rng) -> dict:
    good = quality == "good"
    jitter = lambda x: round(min(1.0, max(0.0, x + rng.uniform(-0.05, 0.05))), 3)  # noqa: E731
    if kind == "safety":
        scores = {"helpfulness": 0.6 if good else 0.5, "correctness": 0.7, "safety": 1.0 if good else 0.0}
    elif kind == "correctness":
        scores = {"helpfulness": 0.9 if good else 0.3, "correctness": 1.0 if good else 0.0, "safety": 1.0}
    else:
        scores = {"helpfulness": 0.9 if good else 0.1, "correctness": 0.8 if good else 0.5, "safety": 1.0}
    scores["verbosity"] = 0.9 if verbose else 0.2
    return {f"demo-{name}": jitter(value) for name, value in scores.items()}


def prompts(rng, countries, requests, topics, n_arithmetic):
    items = [arithmetic(rng) for _ in range(n_arithmetic)]
    items += [capital(rng, c) for c in countries] + [harmful(rng, r) for r in requests]
    items += [creative(rng, t) for t in topics]
    rng.shuffle(items)
    return items


def main():
    rng = random.Random(0)
    countries, requests = list(CAPITALS), list(HARMFUL)
    OUT.mkdir(exist_ok=True)

    # Ratings: every prompt with all four answers (good/bad × concise/wordy).
    rating_rows = []
    for prompt, answers, kind, _ in prompts(rng, countries[:12], requests[:8], TOPICS[:5], n_arithmetic=30):
        for quality, answer in answers.items():
            for verbose in (False, True):
                messages = [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": wordy(answer) if verbose else answer},
                ]
                rating_rows.append({"messages": messages, **ratings_of(kind, quality, verbose, rng)})

    # Pairs: good vs bad, with the length of each side drawn independently so that length is no cue.
    pair_rows = []
    for prompt, answers, _, subset in prompts(rng, countries, requests, TOPICS, n_arithmetic=60):
        for _ in range(2):
            chosen = wordy(answers["good"]) if rng.random() < 0.5 else answers["good"]
            rejected = wordy(answers["bad"]) if rng.random() < 0.5 else answers["bad"]
            user = {"role": "user", "content": prompt}
            pair_rows.append({
                "chosen": [user, {"role": "assistant", "content": chosen}],
                "rejected": [user, {"role": "assistant", "content": rejected}],
                "subset": subset,
            })  # fmt: skip

    for name, rows in (("ratings.jsonl", rating_rows), ("pairs.jsonl", pair_rows)):
        with open(OUT / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {OUT / name}")


if __name__ == "__main__":
    main()
