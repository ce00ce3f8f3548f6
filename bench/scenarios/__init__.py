"""The benchmark's scenarios; each takes a Context and returns a JSON-ready dict."""
