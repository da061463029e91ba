"""Webhooks: completion callbacks, signed by the Standard Webhooks scheme, retried and kept in the store.

- target.py    what a request may ask for (the URL rules) and where a delivery may connect (addresses)
- signing.py   the Standard Webhooks signature headers
- schedule.py  the pure rules: which state change sends which event, the payload, the retry schedule
- delivery.py  the loop that takes due deliveries from the store and sends them, a bounded number at once
- transport.py the HTTP client (aiohttp's) with the address guard at resolution and at connect time
"""
