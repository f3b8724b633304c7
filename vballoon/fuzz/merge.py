"""`vballoon fuzz merge`: the corpora and findings of several workers or machines brought into one `fuzz/`.

Each source DIR is laid out like `fuzz/`: `corpora/<target>/` and `crashes/<target>/` (another machine's
checkout, or a copy of its `fuzz/`). Inputs go through libFuzzer's own merge
(`python fuzz/fuzz_<target>.py -merge=1 DEST STAGED`): one is kept only when it reaches coverage that the
destination's inputs do not. Inputs of the scenario-format targets are kept in their canonical encoding, so
every corpus file decodes strictly, as campaigns and the corpus replay of `make conformance` read them.
Findings are deduplicated by content (SHA-1 of the input) and by signature (`Finding.signature`, from the
sidecar's kind and summary): of one bug the first file is kept, the destination's before the DIRs', in order.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vballoon.errors import DecodeError, UsageError, VballoonError
from vballoon.fuzz.crashes import Finding, crash_files, read_sidecar, sidecar_path, write_new
from vballoon.fuzz.format import decode, encode
from vballoon.fuzz.harness import FUZZ_DIR
from vballoon.fuzz.targets import SCENARIO_FORMAT_TARGETS, TARGETS

LAYOUT_HINT = "pass fuzz/ directories of other workers or machines (corpora/<target>/, crashes/<target>/)"
MERGE_DONE = "MERGE-OUTER: successful"
"""What libFuzzer prints once an inner merge process has gone through every input."""


@dataclass
class CorpusMerge:
    """What merging inputs into one corpus directory did."""

    before: int
    after: int
    offered: int = 0
    """Distinct inputs that were not in the corpus already, given to libFuzzer."""
    not_replayable: int = 0
    """Scenario-format inputs whose canonical encoding does not decode back to the same scenario."""


@dataclass
class FindingsMerge:
    """What merging crash files did: the files copied, and each file left out with the reason."""

    new: list[Path] = field(default_factory=list)
    dropped: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class TargetMerge:
    target: str
    corpus: CorpusMerge
    findings: FindingsMerge

    def line(self) -> str:
        left_out = f", {self.corpus.not_replayable} not replayable left out" if self.corpus.not_replayable else ""
        return (f"fuzz_{self.target}: inputs {self.corpus.before} -> {self.corpus.after} "
                f"({self.corpus.offered} offered{left_out}); "
                f"findings {len(self.findings.new)} new, {len(self.findings.dropped)} duplicate")


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def canonical_input(target: str, data: bytes) -> bytes | None:
    """`data` as the target's corpus keeps it: scenario-format inputs in their canonical encoding (None when that
    does not decode strictly to the same scenario); other targets' inputs unchanged."""
    if target not in SCENARIO_FORMAT_TARGETS:
        return data
    scenario = TARGETS[target].scenario_for(data)
    try:
        canonical = encode(scenario)
        return canonical if decode(canonical, strict=True) == scenario else None
    except DecodeError:
        return None


def libfuzzer_environment(scratch: Path, qemu: str | None) -> dict[str, str]:
    """The environment a target script runs in under libFuzzer's merge: findings saved and fuzzing going on in
    `scratch` (the findings that count come from crash files), and `python3` on PATH the interpreter running
    vballoon (libFuzzer starts the inner merge by running the script itself, whose shebang names python3)."""
    env = dict(os.environ, VBALLOON_FUZZ_KEEP_GOING="1", VBALLOON_FUZZ_CRASHES=str(scratch / "crashes"),
               TMPDIR=str(scratch), PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath))))
    if qemu:
        env["VBALLOON_QEMU"] = qemu
    return env


def merge_corpus(target: str, sources: list[Path], corpus: Path, qemu: str | None = None) -> CorpusMerge:
    """Merge the inputs in `sources` into `corpus` with libFuzzer's -merge=1; VballoonError if the merge fails."""
    corpus.mkdir(parents=True, exist_ok=True)
    known = {_sha1(path.read_bytes()) for path in _files(corpus)}
    result = CorpusMerge(before=len(_files(corpus)), after=0)
    with tempfile.TemporaryDirectory(prefix=f"vballoon-merge-{target}-") as work:
        scratch = Path(work)
        staged = scratch / "staged"
        staged.mkdir()
        for source in sources:
            for path in _files(source):
                data = canonical_input(target, path.read_bytes())
                if data is None:
                    result.not_replayable += 1
                    continue
                digest = _sha1(data)
                if digest not in known:
                    known.add(digest)
                    (staged / digest).write_bytes(data)
                    result.offered += 1
        if result.offered:
            _libfuzzer_merge(target, corpus, staged, scratch, qemu)
    result.after = len(_files(corpus))
    return result


def _libfuzzer_merge(target: str, corpus: Path, staged: Path, scratch: Path, qemu: str | None) -> None:
    command = [sys.executable, str(FUZZ_DIR / f"fuzz_{target}.py"), "-merge=1", f"-artifact_prefix={scratch}/",
               str(corpus), str(staged)]
    log = scratch / "merge.log"
    with log.open("wb") as out:
        status = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=libfuzzer_environment(scratch, qemu), cwd=scratch).returncode
    lines = log.read_text(errors="replace").splitlines()
    if status != 0 or not any(line.startswith(MERGE_DONE) for line in lines):
        why = [line.strip() for line in lines if line.strip() and not line.startswith("MERGE-OUTER")] or ["no output"]
        raise VballoonError(f"fuzz_{target}: libFuzzer's merge into {corpus} failed (exit status {status}): {why[-1]}")


def _signature(crash: Path) -> str | None:
    """The finding's signature from its sidecar; None without one (then only its content identifies it)."""
    sidecar = read_sidecar(crash)
    if "kind" not in sidecar or "summary" not in sidecar:
        return None
    return Finding(str(sidecar["kind"]), str(sidecar["summary"])).signature


def merge_findings(sources: list[Path], crashes: Path) -> FindingsMerge:
    """Copy the crash files (and sidecars) in `sources` into `crashes`, one per content and per signature."""
    result = FindingsMerge()
    seen: dict[str, Path] = {}
    for crash in crash_files(crashes):
        seen.setdefault(_sha1(crash.read_bytes()), crash)
        if (signature := _signature(crash)) is not None:
            seen.setdefault(signature, crash)
    for source in sources:
        for crash in crash_files(source):
            data, signature = crash.read_bytes(), _signature(crash)
            if (first := seen.get(_sha1(data))) is not None:
                result.dropped.append((crash, f"same input as {first}"))
                continue
            if signature is not None and (first := seen.get(signature)) is not None:
                result.dropped.append((crash, f"same signature as {first} ({signature})"))
                continue
            copy = crashes / crash.name
            if not write_new(copy, data):
                result.dropped.append((crash, f"{copy} exists with other content"))
                continue
            if sidecar_path(crash).exists():
                write_new(sidecar_path(copy), sidecar_path(crash).read_bytes())
            seen[_sha1(data)] = copy
            if signature is not None:
                seen[signature] = copy
            result.new.append(copy)
    return result


def _source_targets(dirs: list[Path], say: Callable[[str], None]) -> list[str]:
    """The known targets that any DIR has inputs or findings for, in TARGETS order; one line per other folder."""
    found: set[str] = set()
    for directory in dirs:
        for kind in ("corpora", "crashes"):
            for sub in sorted(p for p in (directory / kind).glob("*") if p.is_dir()):
                if sub.name in TARGETS:
                    found.add(sub.name)
                else:
                    say(f"vballoon: skipping {sub}: not a fuzz target (known: {', '.join(TARGETS)})")
    return [name for name in TARGETS if name in found]


def merge(dirs: list[Path], target: str | None, corpora: Path, crashes: Path, qemu: str | None = None,
          say: Callable[[str], None] = print) -> list[TargetMerge]:
    """Merge every DIR's corpora and findings into `corpora/<target>/` and `crashes/<target>/`; one line per target
    and one per finding left out."""
    if target is not None and target.removeprefix("fuzz_") not in TARGETS:
        raise UsageError(f"--target {target}: unknown fuzz target; known: {', '.join(TARGETS)}")
    for directory in dirs:
        if not directory.is_dir():
            raise UsageError(f"{directory}: no such directory; {LAYOUT_HINT}")
        if not (directory / "corpora").is_dir() and not (directory / "crashes").is_dir():
            raise UsageError(f"{directory}: has neither corpora/ nor crashes/; {LAYOUT_HINT}")
    names = [target.removeprefix("fuzz_")] if target is not None else _source_targets(dirs, say)
    results = []
    for name in names:
        corpus = merge_corpus(name, [d / "corpora" / name for d in dirs], corpora / name, qemu)
        findings = merge_findings([d / "crashes" / name for d in dirs], crashes / name)
        results.append(TargetMerge(name, corpus, findings))
        say(results[-1].line())
        for crash, why in findings.dropped:
            say(f"fuzz_{name}: dropped {crash}: {why}")
    if not names:
        say(f"nothing to merge: no target folders under corpora/ or crashes/ in {', '.join(map(str, dirs))}")
    return results
