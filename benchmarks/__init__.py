"""asv benchmark suites (see asv.conf.json and the README's "Benchmarks" section)."""
