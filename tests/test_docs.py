"""The README and docs/ say only what works: every relative link reaches a file (and its #anchor a heading), and
every `python -m vbshare.<app> ...` command names a module that exists, with overrides that compose.

Commands are read from fenced bash blocks (with their `\\` continuations) and from inline code spans; `...` and
`<placeholder>` stand for what the reader fills in and are left out. A multirun (`-m`) composes with the first
value of each swept key. Nothing trains: the apps' configs are composed with Hydra's compose API.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from helpers import compose_config
from vbshare.harness import read_harness_settings

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HYDRA_APPS = {"vbshare.train": "train", "vbshare.compare": "compare"}  # module -> its config in configs/
EVALUATE_KEYS = ("run_dir", "split", "predictions", "out", "check_base")  # vbshare.evaluate's own keys; the rest
EXPORT_KEYS = ("run_dir", "out", "as_lora", "topk_only", "check_base")    # override the run's train config


PLACEHOLDER = "\0"


def prose(text: str) -> str:
    """The page without its fenced code blocks (a `# comment` in a bash block is no heading, a link there none)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        if re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{page.name}: {target} (no heading #{anchor} in {file.name})")
    return broken


def commands(text: str) -> list[str]:
    """Every `... -m vbshare.X ...` command of a page: lines of fenced blocks (continuations joined) and inline
    code spans."""
    found = []
    for language, block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if language in ("", "bash", "sh", "shell"):
            found += [line for line in block.replace("\\\n", " ").splitlines() if "-m vbshare." in line]
    found += [span for span in re.findall(r"`([^`\n]+)`", prose(text)) if "-m vbshare." in span]
    return found


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(module, arguments) of each vbshare app a command line starts (`a && b` starts two)."""
    line = re.sub(r"<[^>]*>", PLACEHOLDER, line)
    tokens = [t for t in shlex.split(line, comments=True) if PLACEHOLDER not in t]  # `key=<yours>`: left out
    out, parts, current = [], [], []
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    for part in parts:
        for i, token in enumerate(part[:-1]):
            if token == "-m" and part[i + 1].startswith("vbshare."):
                out.append((part[i + 1], [a for a in part[i + 2:] if a != "..."]))
                break
    return out


def first_values(arguments: list[str]) -> list[str]:
    """Hydra overrides with each sweep (`a=1,2`, `range(...)`, `interval(...)`) narrowed to one value."""
    parsed = OverridesParser.create().parse_overrides(arguments)
    out = []
    for override in parsed:
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator()) if override.is_discrete_sweep() else ["0.001"]
            out.append(f"{override.get_key_element()}={values[0]}")
        else:
            out.append(override.input_line)
    return out


def check_invocation(module: str, arguments: list[str]) -> None:
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    flags = {"-m", "--multirun", "--help", "-h", "--cfg", "job", "hydra", "--hydra-help"}
    overrides = [a for a in arguments if a not in flags]
    if module in HYDRA_APPS:
        compose_config(first_values(overrides), name=HYDRA_APPS[module])
    elif module in ("vbshare.evaluate", "vbshare.export"):
        keys = EVALUATE_KEYS if module == "vbshare.evaluate" else EXPORT_KEYS
        own = [o for o in OverridesParser.create().parse_overrides(overrides) if o.key_or_group in keys]
        rest = [a for a in overrides if a.split("=", 1)[0] not in keys]
        assert "run_dir" in {o.key_or_group for o in own}, f"{module} needs run_dir="
        harness = {o.key_or_group.removeprefix("harness."): o.value()
                   for o in OverridesParser.create().parse_overrides(rest) if o.key_or_group.startswith("harness.")}
        if harness:  # the lm-eval bridge's settings, checked as the app checks them (the folder may be the reader's)
            read_harness_settings({k: v for k, v in harness.items() if k != "include_path"})
            rest = [a for a in rest if not a.startswith("harness.")]
        assert module == "vbshare.evaluate" or not rest, f"{module} takes only {', '.join(keys)}, got {rest}"
        compose_config(rest)  # evaluate's other overrides change the run's train config
    # other apps (vbshare.report) take plain arguments: the module existing is what can be checked


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


COMMANDS = [(page, line) for page in PAGES for line in commands(page.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page, line", COMMANDS, ids=[f"{p.name}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_every_command_is_valid(page, line):
    found = invocations(line)
    assert found, f"{page.name}: no vbshare app recognised in {line!r}"
    for module, arguments in found:
        try:
            check_invocation(module, arguments)
        except (HydraException, OmegaConfBaseException) as err:
            pytest.fail(f"{page.name}: {line!r} does not compose: {str(err).splitlines()[0]}")


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    assert "bash scripts/install.sh && python -m vbshare.train +adapter=vblora" in lines[3]
    assert "bash scripts/install.sh && python -m pytest" in lines[4]


def test_the_checks_catch_a_broken_link_and_a_bad_command(tmp_path):
    """The checks themselves can fail: a missing file, a missing anchor, an unknown key, a missing module."""
    (tmp_path / "other.md").write_text("# Only heading\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[a](missing.md) [b](other.md#elsewhere) [c](other.md#only-heading) [d](#page)\n"
                    "```bash\n# not a heading\n```\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)",
                                  "page.md: other.md#elsewhere (no heading #elsewhere in other.md)"]
    with pytest.raises((HydraException, OmegaConfBaseException)):
        check_invocation("vbshare.train", ["+adapter=lora", "trainer.max_stepz=3"])
    with pytest.raises((HydraException, OmegaConfBaseException)):
        check_invocation("vbshare.train", ["+adapter=no_such_method"])
    with pytest.raises(AssertionError, match="no module"):
        check_invocation("vbshare.no_such_app", [])
    assert invocations("bash x.sh && python -m vbshare.train -m +adapter=lora adapter.r=2,4  # a sweep") == [
        ("vbshare.train", ["-m", "+adapter=lora", "adapter.r=2,4"])]
    assert first_values(["adapter.r=2,4", "seed=range(3)"]) == ["adapter.r=2", "seed=0"]
