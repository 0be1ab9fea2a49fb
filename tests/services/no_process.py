class NotAService:
    pass
