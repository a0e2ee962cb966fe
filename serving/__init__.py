"""Serving an ArmoRM: `armorm serve` (`serving.serve`, with its transformers and vLLM backends in `serving.backends`)
and the vLLM plugin (`serving/vllm_armorm`, installed as the top-level package `vllm_armorm`). Serving stands on
`modeling_armorm` alone: it never imports the packages that build or evaluate checkpoints."""
