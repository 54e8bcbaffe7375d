"""The test suite (a package, so that every helper has one module name: tests.support.X)."""
