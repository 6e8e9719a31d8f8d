"""A script: rule's helper; reads snakemake.input, writes snakemake.output."""
from pathlib import Path

lines = Path(snakemake.input[0]).read_text().splitlines()  # noqa: F821 - injected by Snakemake
Path(snakemake.output[0]).write_text(f"{len(lines)} lines, threads={snakemake.threads}\n")  # noqa: F821
