// A CA and a serving certificate for the webhook Service, or a CA and a client certificate (what
// the kube-apiserver presents to the webhook), built with node-forge. Keys come from
// Node's native generator: node-forge's pure-JS RSA generation takes seconds per key.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { isIP } from 'node:net';
import forge from 'node-forge';

export interface CertificateRequest {
  readonly service: string;
  readonly namespace: string;
  /** Extra SANs: DNS names or IP addresses (e.g. 127.0.0.1 for a local webhook). */
  readonly extraNames?: readonly string[];
  readonly validityDays?: number;
  readonly now?: Date;
}

export interface CertificateBundle {
  readonly caCert: string;
  readonly caKey: string;
  readonly cert: string;
  readonly key: string;
  readonly notAfter: Date;
}

function newKeyPair(): { privateKey: forge.pki.rsa.PrivateKey; publicKey: forge.pki.rsa.PublicKey; pem: string } {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048, privateKeyEncoding: { type: 'pkcs8', format: 'pem' }, publicKeyEncoding: { type: 'spki', format: 'pem' } });
  const forgeKey = forge.pki.privateKeyFromPem(privateKey) as forge.pki.rsa.PrivateKey;
  return { privateKey: forgeKey, publicKey: forge.pki.setRsaPublicKey(forgeKey.n, forgeKey.e), pem: forge.pki.privateKeyToPem(forgeKey) };
}

function serialNumber(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0] ?? 0) & 0x7f; // positive
  return bytes.toString('hex');
}

/** The DNS names a Service is reached by from the apiserver. */
export function serviceDnsNames(service: string, namespace: string): string[] {
  return [service, `${service}.${namespace}`, `${service}.${namespace}.svc`, `${service}.${namespace}.svc.cluster.local`];
}

interface Authority {
  readonly cert: forge.pki.Certificate;
  readonly key: forge.pki.rsa.PrivateKey;
}

function newAuthority(commonName: string, notBefore: Date, notAfter: Date): Authority & { readonly keyPem: string } {
  const ca = newKeyPair();
  const cert = forge.pki.createCertificate();
  cert.publicKey = ca.publicKey;
  cert.serialNumber = serialNumber();
  cert.validity.notBefore = notBefore;
  cert.validity.notAfter = notAfter;
  const subject = [{ name: 'commonName', value: commonName }, { name: 'organizationName', value: 'pullbridge' }];
  cert.setSubject(subject);
  cert.setIssuer(subject);
  cert.setExtensions([
    { name: 'basicConstraints', cA: true, critical: true },
    { name: 'keyUsage', keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true },
    { name: 'subjectKeyIdentifier' },
  ]);
  cert.sign(ca.privateKey, forge.md.sha256.create());
  return { cert, key: ca.privateKey, keyPem: ca.pem };
}

/** A leaf certificate signed by `ca`, for a TLS server or a TLS client. */
function issueLeaf(ca: Authority, leaf: { commonName: string; names: readonly string[]; usage: 'server' | 'client'; notBefore: Date; notAfter: Date }): { cert: string; key: string } {
  const keys = newKeyPair();
  const cert = forge.pki.createCertificate();
  cert.publicKey = keys.publicKey;
  cert.serialNumber = serialNumber();
  cert.validity.notBefore = leaf.notBefore;
  cert.validity.notAfter = leaf.notAfter;
  cert.setSubject([{ name: 'commonName', value: leaf.commonName }]);
  cert.setIssuer(ca.cert.subject.attributes);
  cert.setExtensions([
    { name: 'basicConstraints', cA: false, critical: true },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true, critical: true },
    { name: 'extKeyUsage', ...(leaf.usage === 'server' ? { serverAuth: true } : { clientAuth: true }) },
    ...(leaf.names.length > 0 ? [{ name: 'subjectAltName', altNames: leaf.names.map((n) => (isIP(n) ? { type: 7, ip: n } : { type: 2, value: n })) }] : []),
    { name: 'authorityKeyIdentifier', keyIdentifier: ca.cert.generateSubjectKeyIdentifier().getBytes() },
  ]);
  cert.sign(ca.key, forge.md.sha256.create());
  return { cert: forge.pki.certificateToPem(cert), key: keys.pem };
}

function validity(now: Date | undefined, days: number): { notBefore: Date; notAfter: Date; caNotAfter: Date } {
  const at = now ?? new Date();
  return {
    notBefore: new Date(at.getTime() - 5 * 60_000), // tolerate clock skew
    notAfter: new Date(at.getTime() + days * 86_400_000),
    caNotAfter: new Date(at.getTime() + 2 * days * 86_400_000),
  };
}

export function generateCertificates(request: CertificateRequest): CertificateBundle {
  const { notBefore, notAfter, caNotAfter } = validity(request.now, request.validityDays ?? 365);
  const ca = newAuthority(`pullbridge-ca.${request.namespace}`, notBefore, caNotAfter);
  const names = [...serviceDnsNames(request.service, request.namespace), ...(request.extraNames ?? [])];
  const leaf = issueLeaf(ca, { commonName: `${request.service}.${request.namespace}.svc`, names, usage: 'server', notBefore, notAfter });
  return { caCert: forge.pki.certificateToPem(ca.cert), caKey: ca.keyPem, cert: leaf.cert, key: leaf.key, notAfter };
}

export interface ClientCertificateRequest {
  /** The subject CN, which the webhook's `--client-name` checks (as it checks DNS SANs). */
  readonly commonName: string;
  readonly dnsNames?: readonly string[];
  /** Sign with this CA (PEM); a new CA is made when absent. */
  readonly ca?: { readonly cert: string; readonly key: string };
  readonly validityDays?: number;
  readonly now?: Date;
}

/** A client certificate (extended key usage clientAuth), e.g. for the kube-apiserver to present to
 * the webhook, and the CA that signed it. */
export function generateClientCertificate(request: ClientCertificateRequest): CertificateBundle {
  const { notBefore, notAfter, caNotAfter } = validity(request.now, request.validityDays ?? 365);
  const ca = request.ca
    ? { cert: forge.pki.certificateFromPem(request.ca.cert), key: forge.pki.privateKeyFromPem(request.ca.key) as forge.pki.rsa.PrivateKey, keyPem: request.ca.key }
    : newAuthority('pullbridge-client-ca', notBefore, caNotAfter);
  const leaf = issueLeaf(ca, { commonName: request.commonName, names: request.dnsNames ?? [], usage: 'client', notBefore, notAfter });
  return { caCert: forge.pki.certificateToPem(ca.cert), caKey: ca.keyPem, cert: leaf.cert, key: leaf.key, notAfter };
}
