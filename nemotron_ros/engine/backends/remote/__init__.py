"""Remote runtime: an OpenAI-compatible server decodes; the node keeps every contract."""
