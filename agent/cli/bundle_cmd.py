"""`edge-agent bundle build|sign|inspect|keys`: make, sign and look into firmware bundles.

``install``, ``status`` and ``rollback`` come from :mod:`agent.cli.bundle_install_cmd` (added to
the same group). The format, keys and spec are described in docs/bundles.md. Failures are one
line with the reason code and exit 1 (argparse usage errors: 2); progress goes to stderr, results
to stdout.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.bundles.archive import open_bundle, resign_bundle
from agent.bundles.build import build_bundle, default_output, load_spec
from agent.bundles.manifest import BundleManifest
from agent.bundles.signing import (
    generate_key,
    list_keys,
    load_private_key,
    load_trusted_keys,
)
from agent.bundles.target import Target, check_compat, detect_target
from agent.cli import bundle_install_cmd
from agent.config import DEFAULT_CONFIG_PATH
from agent.configfile import load_config, resolve_config_path
from agent.defaults import default_config
from agent.errors import BundleError, BundleSignatureError, TrustedKeyError, reason_code
from agent.process import agent_version

__all__ = ["register"]

_FMT = argparse.RawDescriptionHelpFormatter

EPILOG = """\
Example:
  edge-agent bundle keys generate release --out ~/.edge-agent-keys
  edge-agent bundle build bundle.toml --key ~/.edge-agent-keys/release.key
  edge-agent bundle inspect street-counter-1.4.0.bundle --keys-dir /etc/edge-agent/bundle-keys
  edge-agent bundle install street-counter-1.4.0.bundle --wait

See docs/bundles.md for the file format, the build spec and the install / rollback cycle.
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bundle",
        help="build, sign, inspect and install signed firmware bundles",
        description="A bundle is one signed file (tar + zstd) that updates a device: the agent "
        "wheel and its dependency wheels for the target, models, TensorRT plans, config and "
        "install checks. Build and sign it on a workstation, install it on the device into the "
        "inactive A/B slot; a version that fails its health gate is rolled back by itself.",
        epilog=EPILOG,
        formatter_class=_FMT,
    )
    actions = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    _add_build(actions)
    _add_sign(actions)
    _add_inspect(actions)
    _add_keys(actions)
    bundle_install_cmd.register(actions)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"agent config whose bundles.trusted_keys_dir is the default key folder "
        f"(default: {DEFAULT_CONFIG_PATH} if present, else built-in defaults)",
    )


def _progress(command: str) -> Any:
    def line(text: str) -> None:
        print(f"bundle {command}: {text}", file=sys.stderr, flush=True)

    return line


# ---------------------------------------------------------------------------------- build


def _add_build(actions: Any) -> None:
    build = actions.add_parser(
        "build",
        help="build a bundle from a TOML spec (wheels for the target, models, plans, config)",
        description="Collect everything SPEC names into one bundle file: the agent wheel (given "
        "or built from the project) and its dependency wheels downloaded for the target "
        "platform with pip (--only-binary, --platform, --python-version), models from the "
        "model store with their manifests, TensorRT plans under plans/<key>/, the agent config "
        "(validated first) and the install checks. Each file's size and sha256 go into "
        "manifest.json; with --key the manifest is signed.",
        epilog="Example:\n"
        "  edge-agent bundle build deploy/bundle.toml --key keys/release.key -o dist/\n"
        "  edge-agent bundle build bundle.toml            (unsigned; `bundle sign` later)\n\n"
        "Spec (paths relative to it; more in docs/bundles.md):\n"
        '  name = "street-counter"\n  version = "1.4.0"\n  config = "agent.toml"\n'
        '  [target]\n  boards = ["rpi5"]\n  machine = "aarch64"\n  python = "3.11"\n'
        '  [wheels]\n  project = "."\n  exclude = ["llama-cpp-python"]\n'
        '  [models]\n  names = ["yolox_nano_416"]',
        formatter_class=_FMT,
    )
    build.add_argument("spec", type=Path, metavar="SPEC", help="the bundle spec (TOML)")
    build.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT",
        help="bundle file, or an existing folder for NAME-VERSION.bundle (default: ./)",
    )
    build.add_argument(
        "--key",
        type=Path,
        metavar="KEY",
        help="private key (.key) to sign with (default: unsigned)",
    )
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    out: Path | None = args.output
    if out is None or out.is_dir():
        out = default_output(spec, out)
    result = build_bundle(spec, out, key_path=args.key, progress=_progress("build"))
    print(result.path)
    return 0


# ---------------------------------------------------------------------------------- sign


def _add_sign(actions: Any) -> None:
    sign = actions.add_parser(
        "sign",
        help="sign (or re-sign) a bundle with a private key",
        description="Write BUNDLE with a new manifest.sig made with KEY (Ed25519 over the exact "
        "manifest.json bytes). The payload is checked against the manifest while it is "
        "copied, so a bundle whose content does not match is never signed. In place unless "
        "-o is given.",
        epilog="Example:\n"
        "  edge-agent bundle sign street-counter-1.4.0.bundle --key keys/release.key\n"
        "  edge-agent bundle sign unsigned.bundle --key keys/release.key -o signed.bundle",
        formatter_class=_FMT,
    )
    sign.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle file")
    sign.add_argument("--key", type=Path, metavar="KEY", required=True, help="private key (.key)")
    sign.add_argument("-o", "--output", type=Path, metavar="OUT", help="write here instead")
    sign.set_defaults(func=_sign)


def _sign(args: argparse.Namespace) -> int:
    key = load_private_key(args.key)
    out: Path = args.output or args.bundle
    line = _progress("sign")
    last = [-1]

    def progress(fraction: float, message: str) -> None:
        step = int(fraction * 10)
        if step != last[0]:
            last[0] = step
            line(f"[{fraction * 100:5.1f}%] {message}")

    signature = resign_bundle(args.bundle, out, key, progress=progress)
    line(f"signed with key {signature.key_id!r}")
    print(out)
    return 0


# ---------------------------------------------------------------------------------- inspect


def _add_inspect(actions: Any) -> None:
    inspect = actions.add_parser(
        "inspect",
        help="show a bundle's manifest, signature status and fit for this device",
        description="Read BUNDLE's manifest and signature without installing anything: name, "
        "version, compatibility, files with sizes and sha256, whether the signature verifies "
        "against the trusted keys (--keys-dir, default bundles.trusted_keys_dir) and whether "
        "the bundle fits this device. --check-payload also reads every file and compares it "
        "with the manifest (only once the signature verified). Exit status 1 when the "
        "signature or payload check fails.",
        epilog="Example:\n"
        "  edge-agent bundle inspect street-counter-1.4.0.bundle\n"
        "  edge-agent bundle inspect street-counter-1.4.0.bundle --json --keys-dir keys/\n"
        "  edge-agent bundle inspect street-counter-1.4.0.bundle --check-payload",
        formatter_class=_FMT,
    )
    inspect.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument(
        "--keys-dir", type=Path, metavar="DIR", help="trusted public keys (*.pub / *.pem)"
    )
    inspect.add_argument(
        "--check-payload", action="store_true", help="read and check every payload file"
    )
    _add_config(inspect)
    inspect.set_defaults(func=_inspect)


def _keys_dir(args: argparse.Namespace, explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    path = resolve_config_path(args.config)
    config = default_config() if path is None else load_config(path)
    return config.bundles.trusted_keys_dir


def _inspect(args: argparse.Namespace) -> int:
    keys_dir = _keys_dir(args, args.keys_dir)
    report: dict[str, Any] = {"path": str(args.bundle)}
    failed = False
    with open_bundle(args.bundle) as reader:
        report["size"] = args.bundle.stat().st_size
        manifest = reader.manifest
        report["manifest"] = manifest.model_dump(mode="json", by_alias=True)
        signature: dict[str, Any] = {
            "status": "unsigned" if reader.signature is None else "unchecked",
            "key_id": None if reader.signature is None else reader.signature.key_id,
            "keys_dir": str(keys_dir),
            "detail": None,
        }
        try:
            trusted = load_trusted_keys(keys_dir)
        except (BundleSignatureError, TrustedKeyError) as exc:
            signature["detail"] = str(exc)
            trusted = None
        if trusted is not None:
            try:
                reader.verify(trusted)
                signature["status"] = "verified"
            except BundleSignatureError as exc:
                signature["status"] = "unsigned" if reader.signature is None else "invalid"
                signature["detail"] = str(exc)
                failed = True
        report["signature"] = signature
        payload: dict[str, Any] = {"status": "unchecked", "detail": None}
        if args.check_payload:
            if reader.verified:
                try:
                    reader.check_payload()
                    payload["status"] = "ok"
                except BundleError as exc:
                    payload = {"status": "failed", "detail": f"[{reason_code(exc)}] {exc}"}
                    failed = True
            else:
                payload["detail"] = "the signature did not verify: payload not read"
                failed = True
        report["payload"] = payload
    report["device"] = _device_fit(manifest, detect_target())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_inspect(report)
    return 1 if failed else 0


def _device_fit(manifest: BundleManifest, target: Target) -> dict[str, Any]:
    fit: dict[str, Any] = {
        "board": target.board,
        "machine": target.machine,
        "python": target.python,
        "l4t": target.l4t,
        "tensorrt": target.tensorrt,
        "agent_version": agent_version(),
        "compatible": True,
        "reason": None,
    }
    try:
        check_compat(manifest, target, agent_version())
    except BundleError as exc:
        fit["compatible"] = False
        fit["reason"] = str(exc)
    return fit


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _print_inspect(report: dict[str, Any]) -> None:
    m = report["manifest"]
    compat = m["compat"]
    sig = report["signature"]
    device = report["device"]
    parts = [f"boards {', '.join(compat['boards'])}", compat["machine"]]
    if compat["python"]:
        parts.append(f"Python {compat['python']}")
    if compat["l4t"]:
        parts.append(f"L4T {compat['l4t']}")
    if compat["tensorrt"]:
        parts.append(f"TensorRT {compat['tensorrt']}")
    if compat["min_agent_version"]:
        parts.append(f"agent >= {compat['min_agent_version']}")
    if sig["status"] == "verified":
        sig_text = f"verified with key {sig['key_id']!r} ({sig['keys_dir']})"
    elif sig["status"] == "unchecked":
        sig_text = f"signed with key {sig['key_id']!r}, NOT checked: {sig['detail']}"
    elif sig["status"] == "unsigned":
        sig_text = "UNSIGNED (sign it with `edge-agent bundle sign BUNDLE --key KEY`)"
    else:
        sig_text = f"INVALID: {sig['detail']}"
    fit = "yes" if device["compatible"] else f"no: {device['reason']}"
    total = sum(f["size"] for f in m["files"])
    lines = [
        f"bundle:     {m['name']} {m['version']} (created {m['created']})",
        f"file:       {report['path']} ({_size(report['size'])})",
        f"signature:  {sig_text}",
        f"compat:     {'; '.join(parts)}",
        f"agent:      {m['agent_version'] or '(no agent wheel)'}",
        f"this device: {fit}",
    ]
    payload = report["payload"]
    if payload["status"] != "unchecked" or payload["detail"]:
        detail = f": {payload['detail']}" if payload["detail"] else ""
        lines.append(f"payload:    {payload['status']}{detail}")
    lines.append(f"files:      {len(m['files'])} ({_size(total)})")
    width = max((len(f["path"]) for f in m["files"]), default=0)
    lines += [
        f"  {f['path']:<{width}}  {_size(f['size']):>10}  {f['sha256'][:16]}" for f in m["files"]
    ]
    print("\n".join(lines))


# ---------------------------------------------------------------------------------- keys


def _add_keys(actions: Any) -> None:
    keys = actions.add_parser(
        "keys",
        help="generate and list bundle signing keys",
        description="Ed25519 keys for bundle signatures. A private key is NAME.key (PEM, mode "
        "0600: keep it off the devices); its public half NAME.pub goes into every device's "
        "bundles.trusted_keys_dir. The key id is the file name.",
        epilog="Example:\n"
        "  edge-agent bundle keys generate release --out ~/.edge-agent-keys\n"
        "  edge-agent bundle keys list --dir /etc/edge-agent/bundle-keys",
        formatter_class=_FMT,
    )
    key_actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = key_actions.add_parser(
        "generate",
        help="create a new key pair NAME.key + NAME.pub",
        description="Create NAME.key (private, PEM PKCS8, mode 0600) and NAME.pub (base64 of "
        "the raw public key) in DIR. Existing files are never overwritten.",
        epilog="Example:\n"
        "  edge-agent bundle keys generate release --out ~/.edge-agent-keys\n"
        "  sudo cp ~/.edge-agent-keys/release.pub /etc/edge-agent/bundle-keys/   (on a device)",
        formatter_class=_FMT,
    )
    gen.add_argument("name", metavar="NAME", help="key id: letters, digits, '.', '_', '-'")
    gen.add_argument("--out", type=Path, metavar="DIR", required=True, help="folder for the keys")
    gen.set_defaults(func=_keys_generate)
    lst = key_actions.add_parser(
        "list",
        help="list the keys in a folder (default: the trusted-keys folder)",
        description="List the key files in DIR (default: bundles.trusted_keys_dir) with their "
        "kind and the sha256 fingerprint of the public key.",
        epilog="Example:\n"
        "  edge-agent bundle keys list\n"
        "  edge-agent bundle keys list --dir ~/.edge-agent-keys --json",
        formatter_class=_FMT,
    )
    lst.add_argument("--dir", type=Path, metavar="DIR", help="key folder")
    lst.add_argument("--json", action="store_true", help="print JSON")
    _add_config(lst)
    lst.set_defaults(func=_keys_list)


def _keys_generate(args: argparse.Namespace) -> int:
    private, public = generate_key(args.name, args.out)
    print(f"private key: {private} (keep it secret; sign with --key {private})")
    print(f"public key:  {public} (copy it into bundles.trusted_keys_dir on each device)")
    return 0


def _fingerprint(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def _keys_list(args: argparse.Namespace) -> int:
    folder = _keys_dir(args, args.dir)
    if not folder.is_dir():
        raise BundleSignatureError(
            f"key folder {folder} does not exist (create keys with `edge-agent bundle keys "
            "generate NAME --out DIR`, or give --dir)"
        )
    rows: list[dict[str, str]] = []
    trusted = None
    for key_id, kind, path in list_keys(folder):
        if kind == "private":
            public = load_private_key(path).public_key
        else:
            if trusted is None:
                trusted = load_trusted_keys(folder)
            found = trusted.public_key(key_id)
            if found is None:  # a .pem that is not a public key: TrustedKeys skipped nothing
                raise BundleSignatureError(f"{path} is not a public key")
            public = found
        rows.append(
            {"key_id": key_id, "kind": kind, "path": str(path), "fingerprint": _fingerprint(public)}
        )
    if args.json:
        print(json.dumps({"dir": str(folder), "keys": rows}, indent=2))
        return 0
    if not rows:
        print(f"no keys in {folder}")
        return 0
    width = max(len(r["key_id"]) for r in rows)
    for r in rows:
        print(f"{r['key_id']:<{width}}  {r['kind']:<7}  {r['fingerprint']}  {r['path']}")
    return 0
