"""MkDocs hook: publish the benchmark results (benchmarks/results/*.md and their figures)
as pages of the site, where they are, instead of copying them into docs/."""

from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    root = Path(config.config_file_path).parent
    for path in sorted((root / "benchmarks" / "results").glob("*")):
        if path.suffix in {".md", ".png"}:
            files.append(File(path.relative_to(root).as_posix(), src_dir=str(root),
                              dest_dir=config.site_dir,
                              use_directory_urls=config.use_directory_urls))
    return files
