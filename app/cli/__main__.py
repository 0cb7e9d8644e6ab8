"""`python -m app.cli`: the `tuneforge` command (how `tuneforge up` starts its children)."""

from app.cli import main

if __name__ == "__main__":
    main()
