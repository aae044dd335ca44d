"""The docs are reStructuredText read as plain files and by docutils: a malformed table renders
as an error block (two did, unnoticed), so every page must parse without errors."""
import pathlib

import docutils.core
import docutils.utils
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.rst", *(ROOT / "docs").glob("*.rst")])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_parses_without_errors(page):
    problems = []

    def observe(msg):
        # Sphinx roles (:doc:, :ref:) are unknown to plain docutils; everything else counts
        text = msg.astext()
        if msg["level"] >= docutils.utils.Reporter.ERROR_LEVEL and "role" not in text:
            problems.append(f"{page.name}:{msg.get('line')}: {text.splitlines()[0]}")

    doctree = docutils.core.publish_doctree(
        page.read_text(), source_path=str(page),
        settings_overrides={"report_level": 5, "halt_level": 5})
    for msg in doctree.findall(docutils.nodes.system_message):
        observe(msg)
    assert not problems, "\n".join(problems)
