"""Patient self-service kiosk: find a report by slip code + PIN, print it with a QR code."""
