"""Store-and-forward to the regional cloud PACS over DICOMweb."""
