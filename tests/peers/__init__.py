"""Real peers the tests run against (the cloud PACS, …), started and stopped by the tests."""
