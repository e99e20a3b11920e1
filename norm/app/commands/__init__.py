"""The `norm` command's commands, one module per group. Each module's `register()` adds its parsers to
the command's, each with the function that runs it (`run`); `norm.app.cli` assembles them."""
