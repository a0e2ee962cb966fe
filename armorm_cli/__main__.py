"""`python -m armorm_cli STAGE ...`: the `armorm` console script, for launchers that run a module
(`torchrun --nproc_per_node 8 -m armorm_cli extract ...`)."""

from armorm_cli.cli import console_main


console_main()
