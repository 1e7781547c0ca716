"""Benchmarks: run each as `python -m bench.<name>` from the repository root."""


def run_main(main, argv=None) -> int:
    """main(argv), with a bad model, device or file reported as one line on stderr, exit status 2."""
    import sys

    from xllm.errors import XllmError

    try:
        return main(argv)
    except XllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
