"""The stage jobs: thin Beam composition over the cores, one module per command, each registered once
in `registry`; `common` is what every stage is made of, `media` the chain the vision stages share."""
