"""ClickHouse sink and read models: usage and credit-flow analytics."""
