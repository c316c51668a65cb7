//! Pipeline files: the typed TOML tables (`types`), loading with `extends` and `--set`
//! (`load`), checks against the generated JSON Schema and across fields (`validate`), and
//! `FILE:LINE:COL` diagnostics (`diagnostic`).
