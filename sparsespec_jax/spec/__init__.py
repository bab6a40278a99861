"""Self-speculation: PillarAttn token selection for draft steps and exact acceptance at verification."""
