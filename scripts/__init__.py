"""Benchmarks, screenshots and the GPU acceptance run. A regular package (not a namespace one): a
`scripts` package installed in site-packages would otherwise be imported in its place."""
