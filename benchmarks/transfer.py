#!/usr/bin/env python3
"""Registry transfer throughput against the raw S3 client, measured in one run.

For the same N MB safetensors file it times upload + download four ways:

  raw             the minio client alone: fput_object + fget_object (the baseline)
  presigned       fedhpc registry, presigned path, as fedhpc's producers use it (trainers
                  and the aggregator hash a file while they write it, and hand push() that
                  VerifiedBlob): push = BeginUpload with the sha256, HTTP PUT to a URL the
                  store binds to that sha256, CommitVersion (size, header and manifest
                  checks) + pull = GetVersion, HTTP GET, sha256 verified against the manifest
  presigned+hash  the same for a file nobody has hashed yet (`fedhpc models push FILE`):
                  push hashes it first (whole file and per tensor)
  grpc            fedhpc registry, stream path: push through Upload + pull through
                  Download (chunks pass through the registry process, hashed there)

The registry runs as its own process. MB/s = N / (upload s + download s); each path runs
--repeat times (rounds interleaved across paths) and its best run counts. With --json the
last line is a JSON object (raw_mb_s, presigned_mb_s, grpc_mb_s, presigned_vs_raw,
grpc_vs_raw, presigned_hash_vs_raw, ...).

    python benchmarks/transfer.py --size-mb 256
    python benchmarks/transfer.py --size-mb 64 --json
    python benchmarks/transfer.py --size-mb 256 --endpoint 127.0.0.1:9000 --access-key K --secret-key S
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services"))

from minio import Minio  # noqa: E402

from fedhpc.common.grpc_client import make_channel  # noqa: E402
from fedhpc.common.registry_client import RegistryClient, parse_model_ref  # noqa: E402
from fedhpc.testing.ports import free_port  # noqa: E402
from fedhpc.testing.processes import ServiceProcess  # noqa: E402
from fedhpc.testing.s3server import SeaweedS3Server  # noqa: E402
from fedhpc.testing.synthetic import write_synthetic_model  # noqa: E402

TARGETS = {"presigned_vs_raw": 0.9, "grpc_vs_raw": 0.5}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=256, help="model size in MB (MiB) [256]")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the best counts [3]")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.add_argument("--endpoint", help="use this S3 endpoint host:port instead of starting SeaweedFS")
    parser.add_argument("--access-key", help="S3 access key (with --endpoint)")
    parser.add_argument("--secret-key", help="S3 secret key (with --endpoint)")
    parser.add_argument("--secure", action="store_true", help="HTTPS to --endpoint")
    parser.add_argument(
        "--workdir",
        default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="where the client's source and downloaded files live [/dev/shm: RAM, so disk writeback "
        "does not add noise to either path; the S3 server's data stays on disk]",
    )
    parser.add_argument(
        "--bucket", default=f"fedhpc-bench-{secrets.token_hex(4)}", help="bucket to use [random]"
    )
    args = parser.parse_args()
    if args.endpoint and not (args.access_key and args.secret_key):
        parser.error("--endpoint needs --access-key and --secret-key")
    if args.size_mb <= 0 or args.repeat <= 0:
        parser.error("--size-mb and --repeat must be positive")

    with ExitStack() as stack:
        work = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fedhpc-bench-", dir=args.workdir))
        )
        if args.endpoint:
            endpoint, access, secret = args.endpoint, args.access_key, args.secret_key
        else:
            print("starting SeaweedFS (weed mini) on loopback ...", file=sys.stderr)
            server = stack.enter_context(SeaweedS3Server())
            endpoint, access, secret = server.endpoint, server.access_key, server.secret_key
        s3 = Minio(endpoint, access_key=access, secret_key=secret, secure=args.secure)
        if not s3.bucket_exists(args.bucket):
            s3.make_bucket(args.bucket)

        source = work / "model.safetensors"
        print(f"writing a {args.size_mb} MB synthetic model (60 tensors) ...", file=sys.stderr)
        # The writer hashes while it writes, as trainers and the aggregator do.
        produced = write_synthetic_model(source, args.size_mb)
        size_mb = source.stat().st_size / (1 << 20)

        def raw(i: int) -> tuple[float, float]:
            key = f"raw/{i}.safetensors"
            up = _timed(lambda: s3.fput_object(args.bucket, key, str(source)))
            down = _timed(lambda: s3.fget_object(args.bucket, key, str(work / "raw.out")))
            (work / "raw.out").unlink()
            s3.remove_object(args.bucket, key)
            return up, down

        port = free_port()
        registry = stack.enter_context(
            ServiceProcess(
                ["registry", "serve", "--host", "127.0.0.1", "--port", str(port)],
                address=f"127.0.0.1:{port}",
                env={
                    "FEDHPC_STORE__KIND": "s3",
                    "FEDHPC_STORE__ENDPOINT": endpoint,
                    "FEDHPC_STORE__BUCKET": args.bucket,
                    "FEDHPC_STORE__ACCESS_KEY": access,
                    "FEDHPC_STORE__SECRET_KEY": secret,
                    "FEDHPC_STORE__SECURE": "true" if args.secure else "false",
                    "FEDHPC_LOG__LEVEL": "WARNING",
                },
                log_path=work / "registry.log",
            )
        )
        channel = stack.enter_context(make_channel(registry.address))
        client = RegistryClient(channel)
        client.create_model("bench")

        def via_registry(transport: str, *, hashed: bool) -> Callable[[int], tuple[float, float]]:
            verified = produced if hashed else None

            def run(i: int) -> tuple[float, float]:
                version = f"{transport}-{'hashed' if hashed else 'raw'}-{i}"
                up = _timed(
                    lambda: client.push(
                        "bench", source, version=version, transport=transport, aliases=(), verified=verified
                    )
                )  # type: ignore[arg-type]
                dest = work / f"{version}.out"
                ref = parse_model_ref(f"bench:{version}")
                down = _timed(lambda: client.pull(ref, dest, transport=transport))  # type: ignore[arg-type]
                dest.unlink()
                return up, down

            return run

        paths = {
            "raw": raw,
            "presigned": via_registry("presigned", hashed=True),
            "presigned+hash": via_registry("presigned", hashed=False),
            "grpc": via_registry("stream", hashed=True),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        # Interleaved rounds: background noise (page cache, the S3 server's own work)
        # falls on every path alike instead of on whichever ran during it.
        for i in range(args.repeat):
            for name, run in paths.items():
                print(f"round {i + 1}/{args.repeat}: {name} ...", file=sys.stderr)
                runs[name].append(run(i))
        results = {name: min(times, key=sum) for name, times in runs.items()}
        registry_peak = registry.peak_rss_mib()

    mb_s = {name: size_mb / sum(times) for name, times in results.items()}
    summary: dict[str, float | int | bool | str] = {
        "size_mb": round(size_mb, 1),
        "raw_mb_s": round(mb_s["raw"], 1),
        "presigned_mb_s": round(mb_s["presigned"], 1),
        "grpc_mb_s": round(mb_s["grpc"], 1),
        "presigned_hash_mb_s": round(mb_s["presigned+hash"], 1),
        "presigned_vs_raw": round(mb_s["presigned"] / mb_s["raw"], 3),
        "grpc_vs_raw": round(mb_s["grpc"] / mb_s["raw"], 3),
        "presigned_hash_vs_raw": round(mb_s["presigned+hash"] / mb_s["raw"], 3),
        "registry_peak_rss_mib": round(registry_peak, 1),
        "s3_server": "external" if args.endpoint else "seaweedfs",
    }
    for key, target in TARGETS.items():
        summary[f"{key}_target"] = target
        summary[f"{key}_met"] = bool(summary[key] >= target)  # type: ignore[operator]

    print(f"\n{'path':<15} {'upload s':>9} {'download s':>11} {'MB/s':>8} {'vs raw':>7}")
    for name, (up, down) in results.items():
        print(f"{name:<15} {up:>9.2f} {down:>11.2f} {mb_s[name]:>8.1f} {mb_s[name] / mb_s['raw']:>7.2f}")
    print(f"model {size_mb:.0f} MB; best of {args.repeat}; registry peak RSS {registry_peak:.0f} MiB")
    print(
        "targets: presigned >= 0.9x raw: {}; grpc >= 0.5x raw: {}".format(
            "met" if summary["presigned_vs_raw_met"] else "MISSED",
            "met" if summary["grpc_vs_raw_met"] else "MISSED",
        )
    )
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
