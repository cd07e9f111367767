"""The `polydiff` command line."""
