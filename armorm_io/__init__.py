"""What every `armorm` command reads and writes: data sets (`data`), backbones and tokenizers (`backbone`), feature
shards (`features`), head files (`artifacts`), stage reports (`reports`), atomic writes and content hashes (`files`),
and the process group of a data-parallel run (`distributed`).

It stands on `modeling_armorm` and under the commands: `evaluation` and `conversion` both read these files, and
`armorm build` runs the evaluation, so the formats sit one floor below both.
"""
