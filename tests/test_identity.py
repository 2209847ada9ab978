"""Bound identities and run approval at the site.

A site proves its id by signing the centre's census challenge with the key the hospital made
(``fedmets site keys``); the centre leaves out a node that claims another site's id, and an
old signature does not fit a new challenge. A deployed site answers only runs the hospital
approved (``fedmets site approve``). Real processes: test_deployment_dropout.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
import tomli_w
from conftest import run_fedmets
from flwr.cli.install import install_from_fab
from test_protocol import _cfg, write_sites
from typer.testing import CliRunner

from fedmets.cli import app
from fedmets.client.approval import approvals_path, approve_run, approved_runs
from fedmets.client.policy import PolicyRefused
from fedmets.client.release import answer, site_audit_path
from fedmets.client.service_channel import ServiceClient, ServiceRefused
from fedmets.client.site_service import SiteService, start_service
from fedmets.client.site_worker import SiteWorker
from fedmets.server.app_folder import SOURCE, app_folders, write_app_folder
from fedmets.server.protocol import FederatedProtocol, ProtocolError
from fedmets.shared import wire
from fedmets.shared.app_digest import fab_digest, folder_digest, running_app_digest
from fedmets.shared.config import ConfigError, load_federation_config, load_site_config
from fedmets.shared.identity import identity_problem, make_site_keys, new_challenge, sign
from fedmets.simulation.in_process import InProcessLink
from fedmets.simulation.loopback import flower_bin


def _with_key(toml, key) -> None:
    """Set ``[service] identity_key`` in the site TOML ``toml``."""
    text = toml.read_text()
    toml.write_text(text + f'\n[service]\nidentity_key = "{key}"\n')


@pytest.fixture
def keyed(tmp_path):
    """Three tabular sites, each with its own key; the federation's identities."""
    sites = write_sites(tmp_path / "sites")
    identities = {}
    for site, toml in sites.items():
        private, public = make_site_keys(tmp_path / "keys", site)
        _with_key(toml, private)
        identities[site] = public.read_text()
    return sites, identities


def test_a_node_claiming_another_sites_id_is_left_out(keyed, tmp_path) -> None:
    sites, identities = keyed
    # an impostor: a copy of site_c's folder that says it is site_a, with a key of its own
    impostor = tmp_path / "impostor"
    shutil.copytree(sites["site_c"].parent, impostor)
    toml = impostor / sites["site_c"].name
    text = toml.read_text().replace('site_id = "site_c"', 'site_id = "site_a"')
    own_key, _ = make_site_keys(tmp_path / "keys", "impostor")
    toml.write_text(text.replace(str(tmp_path / "keys" / "site_c"), str(own_key)))
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in sites.items()}
    workers["node-9"] = SiteWorker([load_site_config(toml)])
    said: list[str] = []
    cfg = _cfg(federation={"min_sites": 2, "min_patients": 5, "identities": identities})
    protocol = FederatedProtocol(InProcessLink(workers), cfg, "bound", said.append)
    census = protocol.census()
    assert sorted(protocol.link.sites()) == ["site_a", "site_b", "site_c"]
    assert census["site_a"]["n"] == 70  # the real site_a, not the impostor's 36 patients
    assert any(
        "node-9 refused" in line and "does not verify with site_a's key" in line for line in said
    )
    assert protocol.record.dropouts[0]["site"] == "node-9"

    # without identities the same impostor is only caught as a duplicate id
    workers["node-9"] = SiteWorker([load_site_config(toml)])
    with pytest.raises(ProtocolError, match="two SuperNodes claim the same site id"):
        FederatedProtocol(InProcessLink(workers), _cfg(), "unbound").census()


def test_a_signature_fits_one_challenge_run_and_site_only(keyed) -> None:
    sites, identities = keyed
    worker = SiteWorker([load_site_config(sites["site_b"])])
    challenge = new_challenge()
    reply = {"site_id": "site_b", "identity": sign(worker.identity_key, "run", "site_b", challenge)}
    assert identity_problem(identities, "run", challenge, reply) is None
    assert "does not verify" in identity_problem(identities, "run", new_challenge(), reply)
    assert "does not verify" in identity_problem(identities, "other", challenge, reply)
    claimed = {**reply, "site_id": "site_a"}
    assert "does not verify with site_a's key" in identity_problem(
        identities, "run", challenge, claimed
    )
    assert "without a signature" in identity_problem(
        identities, "run", challenge, {"site_id": "site_b"}
    )
    assert "does not list" in identity_problem(identities, "run", challenge, {"site_id": "site_z"})


def test_keys_are_made_once_and_a_bad_identity_is_a_config_error(tmp_path) -> None:
    runner = CliRunner()
    done = runner.invoke(app, ["site", "keys", "--site", "site_a", "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "site_a").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "site_a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = runner.invoke(app, ["site", "keys", "--site", "site_a", "--out", str(tmp_path)])
    assert again.exit_code == 1 and "is made once" in again.output
    for wrong in ("Hospital A", "sub/hosp"):  # no key a site_id could name; nothing written
        done = runner.invoke(app, ["site", "keys", "--site", wrong, "--out", str(tmp_path / "k")])
        assert done.exit_code == 1 and "not a site id" in done.output, done.output
        assert not (tmp_path / "k").exists()
    bad = tmp_path / "fed.toml"
    data = _cfg().model_dump(mode="json", exclude_none=True)
    data["federation"]["identities"] = {"site_a": "ssh-rsa AAAA not a key"}
    bad.write_text(tomli_w.dumps(data))
    with pytest.raises(ConfigError, match="site_a: not an OpenSSH ECDSA public key"):
        load_federation_config(bad)


def test_keys_into_a_file_or_an_unwritable_folder_name_out(tmp_path) -> None:
    """``--out`` naming a file (or a folder under one) is one line naming it, no errno."""
    (tmp_path / "passwd").write_text("root:x:0:0\n")
    for out in (tmp_path / "passwd", tmp_path / "passwd" / "keys"):
        done = run_fedmets("site", "keys", "--site", "site_a", "--out", out)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(f"error: --out: cannot write {out}: ")
        assert "a folder of yours for the key pair" in done.stderr
        assert "Errno" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert (tmp_path / "passwd").read_text() == "root:x:0:0\n"


def test_approving_a_missing_app_bundle_names_it(tmp_path) -> None:
    """``--app`` naming no file or a folder: one line naming it, no errno, nothing approved."""
    toml = write_sites(tmp_path / "sites")["site_b"]
    fed = tmp_path / "fed.toml"
    fed.write_text(tomli_w.dumps(_cfg().model_dump(mode="json", exclude_none=True)))
    command = ["site", "approve", "--config", toml, "--run-config", fed, "--app"]
    for fab, problem in ((tmp_path / "nope.fab", "not found"), (tmp_path, "a folder, not a file")):
        done = run_fedmets(*command, fab)
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip() == (
            f"--app {fab}: {problem}: give the app bundle (.fab file) the centre sent you"
        )
    assert not approvals_path(load_site_config(toml)).exists()


def test_a_deployed_site_answers_only_approved_runs(tmp_path) -> None:
    toml = write_sites(tmp_path / "sites")["site_b"]
    cfg = _cfg()
    fed = tmp_path / "fed.toml"
    fed.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    census = {
        "run": cfg.run.name,
        "min_patients": 5,
        "protocol": wire.PROTOCOL_VERSION,
        "challenge": new_challenge(),
        "config_sha256": cfg.fingerprint(),
    }
    assert answer(SiteService(toml).worker, "query.census", census)["n"] == 50  # simulation
    worker = SiteService(toml, served=True).worker
    with pytest.raises(PolicyRefused, match=r"policy.approval.*not approved.*fedmets site approve"):
        answer(worker, "query.census", census)
    last = json.loads(site_audit_path(load_site_config(toml)).read_text().splitlines()[-1])
    assert last["rule"] == "policy.approval" and last["sent"] is False

    done = CliRunner().invoke(
        app, ["site", "approve", "--config", str(toml), "--run-config", str(fed)]
    )
    assert done.exit_code == 0, done.output
    assert cfg.fingerprint() in done.output
    assert answer(worker, "query.census", census)["n"] == 50
    assert answer(worker, "query.folds", {"run": cfg.run.name, "folds": 3, "min_patients": 5})

    changed = _cfg(cv={"folds": 5})  # the same run name, another config declared
    with pytest.raises(PolicyRefused, match="was approved with config sha256"):
        answer(worker, "query.census", {**census, "config_sha256": changed.fingerprint()})
    approve_run(load_site_config(toml), changed)  # the hospital approves the new config
    answer(worker, "query.census", {**census, "config_sha256": changed.fingerprint()})

    approvals_path(load_site_config(toml)).write_text("[]")  # edited by hand: named, no traceback
    done = CliRunner().invoke(
        app, ["site", "approve", "--config", str(toml), "--run-config", str(fed)]
    )
    assert done.exit_code == 1 and "approved-runs.json: not a record of approved runs" in (
        done.output
    )


def test_a_run_the_sites_policy_would_refuse_is_not_approved(tmp_path) -> None:
    """``fedmets site approve`` checks the run's planned settings against the site's
    ``[policy]``: a run with more trees and wider networks than the site allows is not
    approved, each refusal named by its rule and route; within the bounds it is."""
    toml = write_sites(tmp_path / "sites")["site_b"]
    site = tomllib.loads(toml.read_text())
    site["policy"] |= {"max_trees": 10, "max_width": 4}
    toml.write_text(tomli_w.dumps(site))
    fed = tmp_path / "fed.toml"
    fed.write_text(tomli_w.dumps(_cfg().model_dump(mode="json", exclude_none=True)))
    approve = ["site", "approve", "--config", str(toml), "--run-config", str(fed)]
    done = CliRunner().invoke(app, approve)
    assert done.exit_code == 1
    assert "not approved: this site's [policy]" in done.output
    assert "policy.max_trees: query.importance: trees 20 is outside" in done.output
    assert "policy.network: train.fusion: hidden [8]: this site trains at most" in done.output
    assert not approvals_path(load_site_config(toml)).exists()

    within = _cfg(selection={"rf_trees": 10}, model={"fusion_hidden": [4]})
    fed.write_text(tomli_w.dumps(within.model_dump(mode="json", exclude_none=True)))
    done = CliRunner().invoke(app, approve)
    assert done.exit_code == 0, done.output
    assert within.run.name in approved_runs(load_site_config(toml))

    # held out, the site is asked only to evaluate the bundle: the training bounds do not apply
    held = _cfg(stages={"final_model": True}, federation={"held_out": ["site_b"]})
    held.run.name = "held-out-run"
    fed.write_text(tomli_w.dumps(held.model_dump(mode="json", exclude_none=True)))
    done = CliRunner().invoke(app, approve)
    assert done.exit_code == 0, done.output


@pytest.mark.slow
def test_an_approval_says_what_the_run_would_spend_of_the_privacy_budget(tmp_path) -> None:
    """``fedmets site approve`` of a run with sample-level DP names the most epsilon the run
    adds at the site (its ``[dp] epsilon``, times the folds under ``epsilon_scope = "fold"``),
    what the site's ledger holds and its budget; a warning when the two together may pass the
    budget (approved: the gate refuses the training that would); not approved once the ledger
    holds the budget, when the gate's ledger check refuses every DP training."""
    from fedmets.client.privacy import site_ledger
    from fedmets.shared.privacy import PrivacyBudgetExceeded, plan_noise_multiplier

    toml = write_sites(tmp_path / "sites")["site_b"]
    site = tomllib.loads(toml.read_text())
    site["policy"]["epsilon_budget"] = 10.0
    toml.write_text(tomli_w.dumps(site))
    cfg = load_site_config(toml)
    fed = tmp_path / "fed.toml"

    def approving(name: str, **dp) -> object:
        run = _cfg(dp={"mode": "sample", **dp})
        run.run.name = name
        fed.write_text(tomli_w.dumps(run.model_dump(mode="json", exclude_none=True)))
        return CliRunner().invoke(
            app, ["site", "approve", "--config", str(toml), "--run-config", str(fed)]
        )

    done = approving("first", epsilon=4.0)
    assert done.exit_code == 0, done.output
    assert (
        "DP: run first spends at most epsilon 4 here ([dp] epsilon 4, epsilon_scope 'run'); "
        "this site's ledger holds 0 of its budget 10: at most 4 after it"
    ) in done.output.replace("\n", "")

    def spend(epsilon: float) -> None:  # DP-SGD trainings of earlier runs, in the site's ledger
        ledger = site_ledger(cfg.paths.output, cfg.site_id, cfg.policy.delta, None)
        z = plan_noise_multiplier(epsilon, cfg.policy.delta, 0.2, 40, spent=ledger.history())
        ledger.record(
            stage="fusion",
            mechanism="dp-sgd",
            noise_multiplier=z,
            sample_rate=0.2,
            steps=40,
            max_grad_norm=1.0,
        )

    spend(7.0)
    done = approving("second", epsilon=1.5, epsilon_scope="fold")  # 3 folds: at most 4.5
    assert done.exit_code == 0, done.output
    said = done.output.replace("\n", "")
    assert "warning: DP: run second spends at most epsilon 4.5 here" in said
    spent = site_ledger(cfg.paths.output, cfg.site_id, cfg.policy.delta, None).epsilon()
    assert 6.9 < spent <= 7.0
    assert f"holds {spent:.3g} of its budget 10: the run may be refused mid-way" in said
    assert "second" in approved_runs(cfg)

    spend(10.01)
    done = approving("third", epsilon=1.0)
    assert done.exit_code == 1
    said = done.output.replace("\n", "")
    assert "policy.epsilon_budget: train.*: this site's privacy ledger holds epsilon 10" in said
    assert "its budget is 10: every DP training would be refused" in said
    assert "third" not in approved_runs(cfg)
    with pytest.raises(PrivacyBudgetExceeded):  # as the site's gate would
        site_ledger(cfg.paths.output, cfg.site_id, cfg.policy.delta, 10.0).check([(1.0, 0.1, 1)])
    assert approving("fourth", epsilon=0.1).exit_code == 1  # however little it asks
    off = _cfg()  # without DP the budget is not asked
    off.run.name = "plain"
    fed.write_text(tomli_w.dumps(off.model_dump(mode="json", exclude_none=True)))
    done = CliRunner().invoke(
        app, ["site", "approve", "--config", str(toml), "--run-config", str(fed)]
    )
    assert done.exit_code == 0 and "DP:" not in done.output

    # another delta: the ledger (kept at 1e-5) is named, not mixed; above 5e-3 epsilons may
    # compose past their sum, so the run's is no longer called a bound
    site["policy"]["delta"] = 0.01
    toml.write_text(tomli_w.dumps(site))
    done = approving("fifth", epsilon=1.0)
    assert done.exit_code == 1 and "accounts at delta 1e-05, not 0.01" in done.output
    shutil.rmtree(cfg.paths.output / "privacy")
    done = approving("sixth", epsilon=1.0)
    said = done.output.replace("\n", "")
    assert "DP: run sixth spends about (delta above 5e-3) epsilon 1 here" in said
    assert "holds 0 of its budget 10: about 1 after it" in said


def test_an_app_folder_is_written_new_or_over_an_app_folder_only(tmp_path) -> None:
    """`fedmets app-folder OUT` writes the bundle's files and nothing else; it refuses a folder
    that is not empty, and with --overwrite one that holds no app folder, keeping its files."""
    out = tmp_path / "app"
    assert CliRunner().invoke(app, ["app-folder", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".gitignore", "pyproject.toml", *app_folders()]
    )
    assert not list(out.rglob("__pycache__")) and (out / "client" / "client_app.py").is_file()
    again = CliRunner().invoke(app, ["app-folder", str(out)])
    assert again.exit_code == 1 and "is not empty (--overwrite replaces" in again.output
    (out / "client" / "stale.py").write_text("")
    assert CliRunner().invoke(app, ["app-folder", str(out), "--overwrite"]).exit_code == 0
    assert not (out / "client" / "stale.py").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    refused = CliRunner().invoke(app, ["app-folder", str(other), "--overwrite"])
    assert refused.exit_code == 1 and "holds no app folder" in refused.output
    assert (other / "notes.txt").read_text() == "keep"
    for inside_out in (SOURCE, SOURCE.parent, SOURCE / "client" / "app"):
        with pytest.raises(ValueError, match="cannot hold its source nor lie in it"):
            write_app_folder(inside_out)
    with pytest.raises(ValueError, match="no pyproject.toml: the Flower app is a checkout"):
        write_app_folder(tmp_path / "from-a-wheel", source=SOURCE / "fedmets")


@pytest.mark.slow
def test_an_approval_pins_the_app_bundle_the_hospital_reviewed(tmp_path) -> None:
    """The app digest of a real ``flwr build`` bundle is the one its relay reports once Flower
    installed it (``install_from_fab``); the bundle of the checkout and that of its app folder
    (``fedmets app-folder``) are the same code, with no docs, tests or simulation tools;
    ``fedmets site approve --app`` pins it, and the service refuses a request relayed by
    another app, logging the app of every request."""
    written = CliRunner().invoke(app, ["app-folder", str(tmp_path / "app")])
    assert written.exit_code == 0 and "next: flwr build --app" in written.output, written.output
    fabs = []
    for name, folder in (("checkout", SOURCE), ("folder", tmp_path / "app")):
        (tmp_path / name).mkdir()
        built = subprocess.run(
            [flower_bin("flwr"), "build", "--app", str(folder)],
            cwd=tmp_path / name,
            capture_output=True,
            text=True,
            check=True,
        )
        fabs += list((tmp_path / name).glob("*.fab"))
    fab = fabs[0]
    digest = fab_digest(fab)
    assert len(fabs) == 2 and fab_digest(fabs[1]) == digest
    with zipfile.ZipFile(fab) as bundle:
        tops = {name.split("/")[0] for name in bundle.namelist()}
    assert tops == {
        ".info",
        "pyproject.toml",
        "fedmets",
        "client",
        "server",
        "shared",
        "site_configs",
    }
    installed = install_from_fab(fab, install_dir=tmp_path / "flwr-home", skip_prompt=True)
    reported = subprocess.run(  # the installed copy's own code, as the relay runs it
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from fedmets.shared.app_digest import running_app_digest; print(running_app_digest())",
            str(installed),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert reported.stdout.strip() == digest, built.stdout
    assert running_app_digest() == ""  # this checkout is not an installed bundle
    (installed / "client" / "__pycache__").mkdir(exist_ok=True)
    (installed / "client" / "__pycache__" / "policy.cpython-311.pyc").write_bytes(b"cache")
    assert folder_digest(installed) == digest  # bytecode caches are not the app
    policy = installed / "client" / "policy.py"
    policy.write_text(policy.read_text().replace("min_count", "min_count_"))
    edited = folder_digest(installed)
    assert edited != digest

    toml = write_sites(tmp_path / "sites")["site_b"]
    cfg = _cfg()
    fed = tmp_path / "fed.toml"
    fed.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    command = ["site", "approve", "--config", str(toml), "--run-config", str(fed)]
    done = CliRunner().invoke(app, [*command, "--app", str(fab)])
    assert done.exit_code == 0 and digest in done.output, done.output
    listed = re.search(r"\): (\d+) files: (.*)\nrecorded in", done.output)
    assert int(listed[1]) == len([n for n in zipfile.ZipFile(fab).namelist() if ".info" not in n])
    assert listed[2].startswith("client/ ") and listed[2].endswith(", pyproject.toml")
    said: list[str] = []
    socket = tmp_path / "site_b.sock"
    server = start_service(SiteService(toml, served=True), socket, say=said.append)
    try:
        folds = {"run": cfg.run.name, "folds": 3, "min_patients": 5}
        request = wire.to_records("query.folds", folds, reply=False)
        assert ServiceClient(socket, app=digest).answer("query.folds", request)
        with pytest.raises(ServiceRefused, match="approved for app sha256 " + digest[:16]):
            ServiceClient(socket, app=edited).answer("query.folds", request)
    finally:
        server.stop(grace=None)
    assert f"Answer query.folds (app {digest[:12]}): answered" in said[0]
    audit = site_audit_path(load_site_config(toml)).read_text().splitlines()
    logged = [json.loads(line) for line in audit[-2:]]
    assert [e["app_sha256"] for e in logged] == [digest, edited]
    assert [e["sent"] for e in logged] == [True, False]
    broken = CliRunner().invoke(app, [*command, "--app", str(toml)])  # not a bundle
    assert broken.exit_code == 1 and "not a Flower app bundle" in broken.output


def test_certs_into_a_file_names_out(tmp_path) -> None:
    """``fedmets certs --out`` naming a file: one line naming it, no errno, nothing written."""
    (tmp_path / "notes").write_text("x\n")
    for out in (tmp_path / "notes", tmp_path / "notes" / "pki"):
        done = run_fedmets("certs", "--out", out)
        assert done.returncode == 1 and "Errno" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"error: --out: cannot write {out}: ")
        assert len(done.stderr.splitlines()) == 1
    assert (tmp_path / "notes").read_text() == "x\n"


def test_a_host_typed_with_a_scheme_or_port_makes_no_ca(tmp_path) -> None:
    """``--host https://fl.example.org`` or ``fl.example.org:9091`` would make the CA (once
    only) and a server certificate that matches no address: refused, nothing written."""
    for host in ("https://fl.example.org", "fl.example.org:9091", "fl example.org"):
        done = run_fedmets("certs", "--out", tmp_path / "pki", "--host", host)
        assert done.returncode == 1 and done.stderr.startswith(f"error: --host {host!r}: not a")
        assert not (tmp_path / "pki").exists()
    for host in ("fl.example.org", "10.0.0.5", "superlink_1"):
        assert run_fedmets("certs", "--out", tmp_path / host, "--host", host).returncode == 0


def test_the_server_certificate_is_renewed_from_the_same_ca(tmp_path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec as ec_keys

    runner = CliRunner()
    made = runner.invoke(app, ["certs", "--out", str(tmp_path), "--host", "fl.example.org"])
    assert made.exit_code == 0, made.output
    assert "keep ca.key off" in made.output

    def load(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((tmp_path / name).read_bytes())

    ca, first = load("ca.crt"), load("server.pem")
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650  # outlives the server's
    assert (first.not_valid_after_utc - first.not_valid_before_utc).days <= 366
    renew = ["certs", "--out", str(tmp_path), "--host", "fl.example.org"]
    done = runner.invoke(app, [*renew, "--renew-server", str(tmp_path / "ca.key")])
    assert done.exit_code == 0, done.output
    second = load("server.pem")
    assert second.serial_number != first.serial_number and load("ca.crt") == ca
    ca.public_key().verify(  # signed by the same CA: the sites' ca.crt still fits
        second.signature,
        second.tbs_certificate_bytes,
        ec_keys.ECDSA(second.signature_hash_algorithm),
    )
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    other = tmp_path / "other"
    runner.invoke(app, ["certs", "--out", str(other)])
    wrong = runner.invoke(app, [*renew, "--renew-server", str(other / "ca.key")])
    assert wrong.exit_code == 1 and "is not the key of" in wrong.output


def test_a_pilots_ca_is_never_replaced_unasked(tmp_path) -> None:
    """`fedmets certs` into a folder that holds a CA is refused before anything is written (it
    made a new CA, cutting off every hospital that trusts the old one); a site key there or a
    --site that is no site id is one line, not a traceback after the CA was replaced; a
    renewal without the folder's ca.crt names it."""
    runner = CliRunner()
    pki = tmp_path / "pki"
    made = runner.invoke(app, ["certs", "--out", str(pki), "--site", "hospital_a"])
    assert made.exit_code == 0, made.output
    before = {p.name: p.read_bytes() for p in pki.iterdir() if p.is_file()}
    again = runner.invoke(app, ["certs", "--out", str(pki), "--host", "fl.example.org"])
    assert again.exit_code == 1 and isinstance(again.exception, SystemExit)
    assert f"{pki / 'ca.crt'}, {pki / 'ca.key'}" in again.output
    assert "a pilot's CA is made once" in again.output and "--renew-server" in again.output
    assert {p.name: p.read_bytes() for p in pki.iterdir() if p.is_file()} == before
    fresh = tmp_path / "fresh"
    for site, expected in (("Bad Id", "not a site id"), ("hospital_a", "already made")):
        (fresh / "sites").mkdir(parents=True, exist_ok=True)
        (fresh / "sites" / "hospital_a").write_text("an earlier key\n")
        done = runner.invoke(app, ["certs", "--out", str(fresh), "--site", site])
        assert done.exit_code == 1 and isinstance(done.exception, SystemExit), done.output
        assert expected in done.output and not (fresh / "ca.crt").exists()
    renew = ["certs", "--out", str(tmp_path / "none"), "--renew-server", str(pki / "ca.key")]
    done = runner.invoke(app, renew)
    assert done.exit_code == 1 and f"{tmp_path / 'none' / 'ca.crt'}: not found" in done.output


def test_the_proxy_config_needs_the_certificates(tmp_path) -> None:
    """proxy-config with a --certs folder that lacks the certificates says so, instead of
    printing a configuration nginx cannot start on."""
    runner = CliRunner()
    command = ["proxy-config", "--folder", str(tmp_path / "proxy"), "--certs"]
    done = runner.invoke(app, [*command, str(tmp_path / "pki")])
    assert done.exit_code == 1 and "daemon off" not in done.output
    assert f"--certs {tmp_path / 'pki'}: no server.pem, server.key, ca.crt" in done.output
    assert runner.invoke(app, ["certs", "--out", str(tmp_path / "pki")]).exit_code == 0
    done = runner.invoke(app, [*command, str(tmp_path / "pki")])
    assert (
        done.exit_code == 0 and f"ssl_certificate {tmp_path / 'pki' / 'server.pem'}" in done.output
    )
    for listen in ("nonsense", "0.0.0.0:99999", "fl.example.org:abc"):  # nginx would not start
        done = runner.invoke(app, [*command, str(tmp_path / "pki"), "--listen", listen])
        assert done.exit_code == 1 and "daemon off" not in done.output
        assert f"--listen {listen!r}: not HOST:PORT (or PORT)" in done.output
    done = runner.invoke(app, [*command, str(tmp_path / "pki"), "--superlink-port", "0"])
    assert done.exit_code == 2 and "daemon off" not in done.output
