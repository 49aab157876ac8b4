"""The `slotmesh` command line: `main` (the entry point and its subcommands) and `flags`
(the shared flag helpers every subcommand imports; a leaf). Config is built here, once."""
