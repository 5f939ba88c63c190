"""What each ``optiflow`` command does, as functions the CLI (and Python users) call."""
