"""`fapool bench ...`: latency and throughput of the engine beside Hugging Face transformers."""
