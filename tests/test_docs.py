"""docs/DESIGN.md is the reference the code cites: every citation resolves, every config field is listed."""
import pathlib
import re

from keel_jax import config_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
DESIGN = REPO / "docs" / "DESIGN.md"


def design_sections() -> set[str]:
  """Section numbers of the headings: '## 2. The math' -> '2', '### 2.4 Keel' -> '2.4'."""
  return {m.group(1) for m in re.finditer(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", DESIGN.read_text(), re.M)}


def citations():
  """(file, line number, line) of every line outside DESIGN.md that names DESIGN.md."""
  for path in REPO.rglob("*"):
    if path.suffix in (".py", ".md", ".ipynb", ".txt", ".ini") and ".git" not in path.parts and path not in (DESIGN, pathlib.Path(__file__).resolve()):
      for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if "DESIGN.md" in line:
          yield path.relative_to(REPO), i, line


def test_every_design_citation_names_a_section_that_exists():
  sections = design_sections()
  assert {"2", "2.4", "3", "5", "6"} <= sections
  found = list(citations())
  assert len(found) >= 15
  for path, i, line in found:
    cited = re.findall(r"DESIGN\.md(?:\]\([^)]*\))? section (\d+(?:\.\d+)*)", line)
    assert cited, f"{path}:{i} cites DESIGN.md without a section number: {line.strip()}"
    for number in cited:
      assert number in sections, f"{path}:{i} cites DESIGN.md section {number}, which does not exist"


def test_config_reference_lists_every_field():
  text = DESIGN.read_text()
  reference = text[text.index("## 5. Config reference"):text.index("## 6.")]
  listed = set(re.findall(r"^\| `([a-z0-9_]+\.[a-z0-9_]+)` \|", reference, re.M))
  fields = set(config_lib.field_names(config_lib.base_config()))
  assert fields - listed == set(), "config fields missing from docs/DESIGN.md section 5"
  assert listed - fields == set(), "docs/DESIGN.md section 5 lists fields that do not exist"
