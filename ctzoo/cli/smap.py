"""``ctzoo smap``: joint t-SNE maps of lesion embeddings held by several hospitals (SMAP). ``features`` writes a
site's embeddings; ``keys`` the parties' TLS keys; ``party`` runs one site's part of the secure joint t-SNE;
``view`` writes its page."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ctzoo.cli.device_option import device_option


@click.group()
def smap() -> None:
    """Joint t-SNE maps of lesion embeddings across hospitals (SMAP), each site's points staying at the site.

    \b
      ctzoo smap features INPUTS... --out site.npz    a site's lesion embeddings, computed locally
      ctzoo smap keys --parties 3 --out keys/        a CA and each party's TLS key (keys/party{i}/)
      ctzoo smap party site.npz --index I --party HOST:PORT ... --keys keys/partyI --out map.npz
                                                      one site's part of the secure joint t-SNE
      ctzoo smap view map.npz --site site.npz         its page: own lesions over the others' density
    """


@smap.command("features")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The site file (.npz): features, labels, scores and the model's name and weights digest.")
@click.option("--model", default="recistnet-mini", show_default=True,
              help="The zoo detector (or a bundle folder) every site must embed with.")
@click.option("--deeplesion", "deeplesion_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Embed the annotated lesions of this DL_info.csv instead (labels: coarse type).")
@click.option("--patients", default=None, help="With --deeplesion: only these Patient_index values, e.g. 1-40,52.")
@device_option("cpu", "Where the detector runs (PyTorch): cpu, cuda, cuda:N or auto.")
def features(inputs: tuple[Path, ...], out: Path, model: str, deeplesion_csv: Path | None, patients: str | None,
             device: str) -> None:
    """Write a site's lesion embeddings: RECIST-Net's decoder features pooled over each lesion's box.

    \b
    From CT INPUTS (what ctzoo infer takes): every finding at the detector's operating point, no label.
    From --deeplesion DL_info.csv: every annotated lesion, labelled with its coarse type where known.
    The file identifies nobody: no identifiers or hashes, no file names or positions, rows shuffled.
    """
    from ctzoo.cli.bundles import resolve_bundles
    from ctzoo.models.bundle import BundleError
    from ctzoo.smap.features import deeplesion_site, parse_patients, volumes_site
    from ctzoo.smap.site_file import write_site

    if bool(inputs) == (deeplesion_csv is not None):
        raise click.UsageError("give CT INPUTS or --deeplesion DL_info.csv (one of them)")
    if patients is not None and deeplesion_csv is None:
        raise click.UsageError("--patients selects DeepLesion patients: it needs --deeplesion")
    bundle = resolve_bundles([model])[model]
    try:
        if bundle.task != "detection":
            raise click.ClickException(f"{bundle.name} is a {bundle.task} model: site embeddings need a detector")
        if deeplesion_csv is not None:
            chosen = parse_patients(patients) if patients is not None else None
            site = deeplesion_site(deeplesion_csv, bundle, chosen, device)
        else:
            site = volumes_site(inputs, bundle, device, say=click.echo)
        path = write_site(site, out)
    except (BundleError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{path}: {len(site['labels'])} lesions x {site['features'].shape[1]} features "
               f"({site['meta']['kind']}, {bundle.name} {bundle.version})")


@smap.command("keys")
@click.option("--parties", type=click.IntRange(3), required=True, help="How many parties will run.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A new folder: OUT/party{i} holds the CA certificate and party i's key and certificate.")
@click.option("--days", type=click.IntRange(1), default=365, show_default=True, help="Validity of the certificates.")
def keys(parties: int, out: Path, days: int) -> None:
    """Make the keys for mutually authenticated TLS between the parties: a certificate authority (its private
    key is discarded once the certificates are signed) and one key and certificate per party. Hand each site
    only its own OUT/party{i} folder, over a channel you trust."""
    from ctzoo.smap.keys import make_party_keys

    try:
        folders = make_party_keys(parties, out, days)
    except (ValueError, FileExistsError, RuntimeError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{out}: keys for {len(folders)} parties ({', '.join(f.name for f in folders)}), valid {days} days")


def _party_addresses(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """Each --party as given, once it is HOST:PORT with a host and a port from 1 to 65535 (an IPv6 host in [])."""
    for address in values:
        host, colon, port = address.rpartition(":")
        if not colon or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise click.BadParameter(f"{address!r} is not HOST:PORT (a port from 1 to 65535, e.g. "
                                     "hospital-a.example:5001)")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise click.BadParameter(f"{address!r}: an IPv6 host goes in [], e.g. [{host}]:{port}")
    return values


def _writable_map_path(out: Path, site: Path | None) -> Path:
    """``--out`` resolved, once it is not the SITE file and its folder exists (made if need be) and takes a new
    file: checked before the run, which takes minutes to hours, rather than when the map is written."""
    import tempfile

    out = out.resolve()
    if site is not None and out == site.resolve():
        raise click.UsageError(f"--out {out} is the SITE file: the map would replace this site's lesions; give "
                               "another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise click.ClickException(f"--out {out}: cannot write a file in {out.parent} ({error.strerror or error}); "
                                   "nothing was run") from None
    return out


@smap.command("party")
@click.argument("site", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--helper", is_flag=True,
              help="Join without a SITE file: a party with no lesions (two hospitals need a third party for an "
                   "honest majority). It learns the map's extent and the joint density only.")
@click.option("--index", type=click.IntRange(0), required=True, help="This party's place in the --party list.")
@click.option("--party", "addresses", multiple=True, required=True, metavar="HOST:PORT", callback=_party_addresses,
              help="Every party's address, in the same order on every party (repeat; at least 3).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="What this party learns (.npz): its own points' coordinates, the joint density, ...")
@click.option("--perplexity", type=click.FloatRange(1, 200), default=30.0, show_default=True)
@click.option("--iterations", type=click.IntRange(1, 5000), default=300, show_default=True)
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True)
@click.option("--early-iterations", type=click.IntRange(0), default=0, show_default=True,
              help="Iterations with 12x early exaggeration (none by default: see docs/smap.md).")
@click.option("--seed", type=int, default=0, show_default=True, help="Of the public initialisation.")
@click.option("--grid", type=click.IntRange(4, 128), default=24, show_default=True,
              help="Cells per axis of the density of the others' points.")
@click.option("--share-points", is_flag=True,
              help="Open every point (with its site and label) to every party, if every party gives this flag.")
@click.option("--keys", "keys_folder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="This party's folder from ctzoo smap keys: every connection is mutually authenticated TLS.")
@click.option("--no-tls", is_flag=True,
              help="Plain TCP without authentication (allowed only when every --party is on loopback).")
@click.option("--connect-timeout", type=click.FloatRange(1), default=120.0, show_default=True,
              help="Seconds to wait for every party to connect.")
@click.option("--peer-timeout", type=click.FloatRange(1), default=300.0, show_default=True,
              help="Seconds a connected party may send nothing while this one waits for it (frozen, or its network "
                   "cut off) before the run is aborted (exit status 3).")
@click.option("--insecure-reveal-p", is_flag=True,
              help="Open the joint P to every party (testing and comparison with the plaintext t-SNE only).")
@click.option("--insecure-plaintext", is_flag=True,
              help="Open every party's points to every party and compute the t-SNE in the clear (for sites that "
                   "may share, and for comparison); every party must give it.")
def party(site: Path | None, helper: bool, index: int, addresses: tuple[str, ...], out: Path, perplexity: float,
          iterations: int, learning_rate: float, early_iterations: int, seed: int, grid: int, share_points: bool,
          keys_folder: Path | None, no_tls: bool, connect_timeout: float, peer_timeout: float, insecure_reveal_p: bool,
          insecure_plaintext: bool) -> None:
    """Join a secure joint t-SNE as party --index, with this site's SITE file (ctzoo smap features) or as a
    --helper without one.

    \b
    Every party runs the same command with its own SITE and --index and the same list and options:
      ctzoo smap party a.npz --index 0 --party 127.0.0.1:11365 --party 127.0.0.1:11366 \\
          --party 127.0.0.1:11367 --keys keys/party0 --out a-map.npz
    Shamir secret sharing (MPyC), honest majority: no single party learns another's points. Each party learns
    its own points' coordinates in the joint map and the joint density on a grid (with the others' density);
    with --share-points on every party, every point. Connections are TLS with the --keys of ctzoo smap keys.
    """
    from ctzoo.io.atomic import atomic_path
    from ctzoo.smap.connections import AuthenticationFailed, CannotListen, ClosingCheckFailed, PartyDropped
    from ctzoo.smap.party import RunOptions, on_loopback, run_party
    from ctzoo.smap.secure import SATURATED
    from ctzoo.smap.site_file import site_digest

    if (site is None) != helper:
        raise click.UsageError("give this site's SITE file, or --helper for a party without lesions")
    if len(addresses) < 3:
        raise click.UsageError("give at least 3 --party addresses: with 2, one party's shares would reveal the other's"
                               " (two hospitals add a --helper party)")
    if index >= len(addresses):
        raise click.UsageError(f"--index {index} names no party: there are {len(addresses)}")
    if (keys_folder is None) == (not no_tls):
        raise click.UsageError("give --keys (this party's folder from ctzoo smap keys) or, on loopback only, --no-tls")
    if no_tls and not all(on_loopback(address) for address in addresses):
        raise click.UsageError("--no-tls is allowed only when every --party is on loopback: give --keys")
    options = RunOptions(perplexity, iterations, learning_rate, early_iterations, seed, grid, share_points,
                         insecure_reveal_p, insecure_plaintext)
    out = _writable_map_path(out, site)
    digest = "" if site is None else site_digest(site)  # what ctzoo smap view checks the site file against
    try:
        result = run_party(site, index, addresses, options, keys=keys_folder, connect_timeout=connect_timeout,
                           peer_timeout=peer_timeout)
    except (ValueError, PartyDropped, AuthenticationFailed, CannotListen, ClosingCheckFailed) as error:
        raise click.ClickException(str(error)) from error
    arrays = {name: np.asarray(result[name]) for name in ("counts", "own", "extent", "density", "others_density",
                                                           "p", "all_points", "all_labels", "all_sites")
              if name in result}
    with atomic_path(out) as partial:
        with open(partial, "wb") as handle:
            np.savez(handle, index=np.asarray(index), shared=np.asarray(result["shared"]),
                     plaintext=np.asarray(insecure_plaintext), site_digest=np.asarray(digest),
                     seconds=np.asarray([result["seconds"]["p"], result["seconds"]["embedding"]]),
                     bytes_phases=np.asarray([result["bytes_phases"]["p"], result["bytes_phases"]["embedding"]]),
                     bytes_sent=np.asarray(result["bytes_sent"]), p_saturated=np.asarray(result["p_saturated"]),
                     **arrays)
    if result["p_saturated"]:
        click.echo(f"Warning: {SATURATED}", err=True)
    others = "every point shared" if result["shared"] else "the others as density"
    if insecure_plaintext:
        others += " (plaintext: every party saw every point's features)"
    click.echo(f"party {index}: {sum(result['counts'])} points in all ({', '.join(map(str, result['counts']))}); "
               f"its own {len(result['own'])} placed; {others}; P {result['seconds']['p']:.1f} s, "
               f"{iterations} iterations {result['seconds']['embedding']:.1f} s, {result['bytes_sent'] / 1e6:.1f} MB "
               f"sent -> {out}")


@smap.command("view")
@click.argument("map_file", metavar="MAP", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--site", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The site file this party ran with: its points' labels never left it.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The page (default: MAP with .html).")
def view(map_file: Path, site: Path, out: Path | None) -> None:
    """Write one party's joint map as an offline page: its own lesions by type over the other sites' density
    (or every lesion by site, when every site agreed to share)."""
    from ctzoo.io.atomic import atomic_path
    from ctzoo.smap.page import read_map, render_map_html
    from ctzoo.smap.site_file import read_site

    target = out or map_file.with_suffix(".html")
    try:
        text = render_map_html(read_map(map_file, read_site(site)))
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    with atomic_path(target) as partial:
        partial.write_text(text, encoding="utf-8")
    click.echo(f"{target} ({target.stat().st_size / 1e6:.1f} MB)")
