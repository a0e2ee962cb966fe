"""Building and publishing ArmoRM checkpoints: extract → fit → decorrelate → gate → assemble → push (arXiv 2406.12845),
`armorm build` for all of them at once, and `armorm convert-rlhflow` for the released checkpoint."""
