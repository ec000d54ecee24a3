"""The core every stage uses: config schema, run directory, atomic writes, errors, logs, hashing, model resolution.

Nothing here imports a stage (kstory.prep, .train, .story, .scoring, .submissions, .app) or the command line
(kstory.cli); the import-linter contracts in pyproject.toml keep it so.
"""
