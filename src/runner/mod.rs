//! The runner: stages of a pipeline in order, fingerprints, resume and watch mode.
