"""The web dashboard at /ui: jobs, live loss curves, adapters and a playground, from files in this package."""
