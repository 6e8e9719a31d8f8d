"""A script: rule: a digest of a binary input and the counted files, in order."""
import hashlib

digest = hashlib.sha256(open(snakemake.input.blob, "rb").read()).hexdigest()  # noqa: F821 - injected
with open(snakemake.output[0], "w") as out:  # noqa: F821
    out.write(f"blob {digest}\n")
    for name in snakemake.input.counted:  # noqa: F821
        out.write(f"{name}: {open(name).read()}")
