"""Console subcommands that are not LightningCLI loops (``lina sample``, ``lina evaluate``)."""
