"""mkdocs hook: serve benchmarks/results/*.md and *.png (and each run's loss.png) as docs/results/...

mkdocs only reads files under docs/; the benchmark tables and plots live next to the benchmarks that write
them. This adds them to the build as if they were docs/results/<name>, so docs/benchmarks.md can link and
embed them and `mkdocs build --strict` checks those links. Nothing is copied into the repository.
"""
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
PATTERNS = ("*.md", "*.png", "*/loss.png")


def on_files(files, config):
    for pattern in PATTERNS:
        for path in sorted(RESULTS.glob(pattern)):
            files.append(File(str(Path("results") / path.relative_to(RESULTS)), src_dir=str(RESULTS.parent),
                              dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files


def on_serve(server, config, builder):
    server.watch(str(RESULTS))
    return server
