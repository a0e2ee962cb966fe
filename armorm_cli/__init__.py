"""The `armorm` command: a thin dispatcher over the packages (`armorm_cli.cli`), and the command-line face of the
`reward-scoring` pipeline (`armorm score`, `armorm explain`). Nothing in the packages imports it."""
