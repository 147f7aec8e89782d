"""`packerfs serve`: the HTTP piece gateway (FRC-0066 /piece/{cid}) over the same engine as a mount."""

from __future__ import annotations

import argparse

from packerfs.commands.options import EPILOG, SRC_HELP, add_pack_options


def cmd_serve(args: argparse.Namespace) -> int:
    from packerfs.commands.options import serving_engine
    from packerfs.http.server import configure_logging, serve_gateway

    state_dir, _, serve_engine = serving_engine(args)

    def announce(url: str) -> None:
        print(f"packerfs: serving pieces at {url}/piece/{{piece CID}} (state {state_dir}); Ctrl-C stops", flush=True)

    configure_logging()
    return serve_gateway(
        serve_engine, state_dir, args.listen, token_file=args.token_file, tls_cert=args.tls_cert,
        tls_key=args.tls_key, insecure_listen=args.insecure_listen, max_connections=args.max_connections,
        skip_unreadable=args.skip_unreadable, repack_below=args.repack_below, announce=announce,
    )


def register(commands) -> None:
    p = commands.add_parser(
        "serve",
        help="serve SRC's pieces over HTTP to storage providers (GET /piece/{cid})",
        description="Serve the CARs of SRC, generated on read as `mount` does (same options, same state, "
        "byte-identical to `pack`), over HTTP: GET|HEAD /piece/{piece CID v1 or v2} (FRC-0066, with Range), "
        "/piece?id={cid} (Curio's PieceLocator), /manifest.csv, /manifest.json and /status (scan progress "
        "and transfers). The scan runs in the background; a piece is served once its bin is sealed. "
        "Runs in the foreground (logs and one access line per request on stderr) until SIGINT or SIGTERM.",
        epilog=EPILOG,
    )
    p.add_argument("source", metavar="SRC", help=SRC_HELP)
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8080; port 0 picks a free one, printed at start)")
    add_pack_options(p)
    p.add_argument("--skip-unreadable", action="store_true", help="skip unreadable files (listed in /status) instead of failing the scan")
    p.add_argument("--token-file", metavar="FILE",
                   help="require `Authorization: Bearer TOKEN`, TOKEN being FILE's content (compared in constant time)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--insecure-listen", action="store_true",
                   help="allow a non-loopback --listen without a token or TLS (anyone reaching it can fetch pieces)")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="piece transfers at once; more get 503 with Retry-After (default 64)")
    p.set_defaults(func=cmd_serve)
