"""One Hydra app per subcommand; ``tropd_cli.cli`` dispatches to them."""
