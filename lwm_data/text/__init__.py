"""The text cores, plain functions on one record (no Beam): book readers (books), chunking, QA prompts,
validation and the cloze backend (qa), the LLM client and vLLM server (llm), long-context chat
examples (chat), and the needle eval's prompts and scoring (needle)."""
