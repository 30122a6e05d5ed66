"""Ray Data steps: read, tokenize, pack, validate, report. Each step is a plain function or callable class on
`dict[str, np.ndarray]` / pyarrow that unit tests call without a cluster; the Ray wiring lives beside them."""
