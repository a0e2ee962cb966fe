"""The ArmoRM conversion pipeline: extract → fit → decorrelate → gate → assemble → push (SPEC §3)."""
