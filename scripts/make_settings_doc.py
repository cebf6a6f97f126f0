"""Write docs/settings.md, the table of every setting and its facts, from TrainConfig's fields.

    python scripts/make_settings_doc.py

tests/test_settings.py fails while the file differs from what this writes.
"""
from pathlib import Path

from trainkit.config import settings_markdown

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    path.write_text(settings_markdown())
    print(f"wrote {path}")
