"""`python -m cipo_lightning fit --config configs/quickstart.yaml` (also validate, test)."""

from cipo_lightning.cli import main

# The guard matters: vLLM may start worker processes with spawn, which re-imports the main module.
if __name__ == "__main__":
    main()
