# The image every service in compose.yaml runs: titan-broker with its examples.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir ".[examples]"
ENV PYTHONUNBUFFERED=1
CMD ["titan", "--help"]
