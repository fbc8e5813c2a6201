"""One module per ``cryoforum`` subcommand: ``add_args(parser)`` and ``main(args)``."""
