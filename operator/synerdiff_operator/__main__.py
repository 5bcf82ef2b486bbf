"""`python -m synerdiff_operator`: run the operator (one replica; no peering, hence --standalone)."""

from __future__ import annotations

import argparse

import kopf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synerdiff-operator", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf's liveness endpoint; empty to disable")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import synerdiff_operator.handlers  # noqa: F401  registers the handlers

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON)
    kopf.run(
        standalone=True,  # a single replica with strategy Recreate: no peering objects or RBAC for them
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
