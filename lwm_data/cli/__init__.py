"""The `lwm-data` command: one command per stage (main), and the tools around them."""
