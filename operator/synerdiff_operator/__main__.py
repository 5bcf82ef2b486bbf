"""`python -m synerdiff_operator`: run the operator; with `--peering`, one of several replicas.

Without `--peering` it runs standalone (no peering objects, no RBAC for them): one replica only.
With `--peering NAME`, every replica draws a random priority and kopf's peering object NAME makes
all but the highest stand by (see `peering.py`); a standby takes over when the worker stops.
"""

from __future__ import annotations

import argparse
import secrets

import kopf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synerdiff-operator", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf's liveness endpoint; empty to disable")
    parser.add_argument("--peering", default="", help="kopf peering object shared by the replicas; empty: standalone (a single replica)")
    parser.add_argument("--priority", type=int, default=None, help="peering priority; default: drawn at random, so that exactly one replica is highest")
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import synerdiff_operator.handlers  # noqa: F401  registers the handlers

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON)
    peering = bool(args.peering)
    kopf.run(
        standalone=not peering,
        peering_name=args.peering or None,
        priority=(args.priority if args.priority is not None else secrets.randbelow(2**31 - 1) + 1) if peering else None,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
